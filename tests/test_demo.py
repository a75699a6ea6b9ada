"""The README's first command runs this demo; it must keep working and keep checking."""

from lokr_trainer import demo


def test_demo_trains_bakes_and_checks(tmp_path, capsys):
    report = demo.run(tmp_path)
    assert report["layouts_bit_identical"] is True
    assert report["fp16_resave_same_keys"] is True
    assert report["keys_per_component"] == {"unet": 428, "text_encoder": 53, "text_encoder_2": 42, "vae": 156}
    assert 0 < report["fp16_resave_max_abs_error"] < 1e-2  # fp16 rounding, not garbage
    # training on the memorisable set lowers the fixed-noise validation loss clearly
    vals = [v for _, v in report["validation_losses"]]
    assert [s for s, _ in report["validation_losses"]] == [0, 30, 60, 90, 120]
    assert vals[-1] < 0.8 * vals[0]
    assert report["steps"] == 120 and len(report["samples"]) == 1
    assert report["merge_exit_code"] == 0
    assert report["adapter_changes_output"] is True
    assert report["baked_vs_adapted_max_abs_diff"] <= 1e-5
    assert demo.print_report(report) is True
    out = capsys.readouterr().out
    assert "demo OK" in out and "validation loss" in out


def test_a_demo_stopped_by_ctrl_c_says_so_in_one_line_and_exits_130(tmp_path, capsys, monkeypatch):
    """Ctrl-C makes the trainer save and stop early; the demo must not then bake a missing adapter."""
    from lokr_trainer.train.loop import Trainer, TrainResult

    def stopped(self):
        return TrainResult(self.output_dir, None, 0, 93, 120, stopped="signal")

    monkeypatch.setattr(Trainer, "fit", stopped)
    assert demo.main(["--out", str(tmp_path / "demo"), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "demo interrupted after step 93 of 120: nothing baked or checked; run it again to start afresh"
    ]
    assert "Traceback" not in err
