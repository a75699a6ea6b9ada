"""The README's first command runs this demo; it must keep working and keep checking."""

from lokr_trainer import demo


def test_demo_reports_identical_layouts_and_exact_key_sets(tmp_path, capsys):
    report = demo.run(tmp_path)
    assert report["layouts_bit_identical"] is True
    assert report["fp16_resave_same_keys"] is True
    assert report["keys_per_component"] == {"unet": 428, "text_encoder": 53, "text_encoder_2": 42, "vae": 156}
    assert 0 < report["fp16_resave_max_abs_error"] < 1e-2  # fp16 rounding, not garbage
    assert report["adapter_changes_output"] is True
    assert report["baked_vs_attached_max_abs_diff"] <= 1e-5
    assert demo.main(["--out", str(tmp_path / "cli")]) == 0
    assert "demo OK" in capsys.readouterr().out
