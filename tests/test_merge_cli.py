"""``python -m lokr_trainer.merge``: flags, recipe files, dry runs, exit codes, light imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_merge_support import bits, files_in, lokr_module, perturbed, read_all, write_lokr_file

from lokr_trainer.errors import ConfigError
from lokr_trainer.merge.__main__ import main
from lokr_trainer.merge.recipe import LoKrInput, Recipe, load_recipe, recipe_to_toml


@pytest.fixture(autouse=True)
def keep_malloc(monkeypatch):
    """main() tunes glibc for the whole process; not for the test runner's (the subprocess test does it for real)."""
    from lokr_trainer.merge import stream

    monkeypatch.setattr(stream, "tune_malloc", lambda: False)


@pytest.fixture(scope="module")
def work(tiny_sdxl, tmp_path_factory):
    d = tmp_path_factory.mktemp("merge_cli")
    perturbed(tiny_sdxl.single_file, d / "b.safetensors", seed=21)
    g = torch.Generator().manual_seed(3)
    write_lokr_file(d / "l.safetensors", {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": lokr_module((64, 64), g),
        "lora_te2_text_model_encoder_layers_1_self_attn_v_proj": lokr_module((32, 32), g),
    })
    return d


def test_flags_and_recipe_file_give_the_same_bytes(tiny_sdxl, work, capsys):
    a = tiny_sdxl.single_file
    rc = main(["--out", str(work / "flags.safetensors"), "--base", str(a), str(work / "b.safetensors"),
               "--weights", "0.7", "0.3", "--restore-embeddings", str(a), "--lokr", f"{work / 'l.safetensors'}:0.75",
               "--dtype", "bf16", "--title", "t", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "weighted_sum -> restore_embeddings -> bake_lokr" in printed and "wrote " in printed
    rows = {line.split()[0]: [int(x) for x in line.split()[1:]] for line in printed.splitlines()
            if line.split()[:1] in (["UNet"], ["TE2"])}
    # total, summed, restored, copied, baked, cast, verbatim
    assert rows["UNet"] == [428, 428, 0, 0, 1, 0, 0] and rows["TE2"] == [42, 39, 2, 1, 1, 0, 3], printed
    # the same as a recipe file, relative paths (resolved against the file's folder), table forms
    a_rel = Path("..") / a.parent.name / a.name if a.parent.parent == work.parent else a
    (work / "r.toml").write_text(
        f'out = "recipe.safetensors"\n'
        f'base = [{{path = "{a}", weight = 0.7}}, {{path = "b.safetensors", weight = 0.3}}]\n'
        f'restore-embeddings = "{a_rel}"\n'
        f'lokr = [{{path = "l.safetensors", multiplier = 0.75}}]\n'
        f'dtype = "bf16"\ntitle = "t"\n'
    )
    assert main(["--recipe", str(work / "r.toml"), "--no-progress"]) == 0
    x, mx = read_all(work / "flags.safetensors")
    y, my = read_all(work / "recipe.safetensors")
    assert set(x) == set(y) and all(torch.equal(bits(x[k]), bits(y[k])) for k in x)
    assert mx == my


def test_dry_run_writes_nothing_and_reports_memory(tiny_sdxl, work, capsys):
    out = work / "dry" / "o.safetensors"
    rc = main(["--out", str(out), "--base", str(tiny_sdxl.single_file), "--base", str(tiny_sdxl.diffusers_dir),
               "--lokr", str(work / "l.safetensors"), "--dry-run"])
    text = capsys.readouterr().out
    assert rc == 0 and not out.parent.exists()
    assert "dry run: nothing written" in text and "expected peak memory:" in text
    assert "(diffusers folder)" in text and "l.safetensors" in text
    assert "LoKr modules" in text


def test_errors_exit_1_with_the_message(tiny_sdxl, work, capsys):
    out = work / "exists.safetensors"
    out.write_bytes(b"x")
    rc = main(["--out", str(out), "--base", str(tiny_sdxl.single_file), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "exists.safetensors" in err and "--overwrite" in err
    rc = main(["--out", str(work / "w.safetensors"), "--base", str(tiny_sdxl.single_file), "--weights", "0.5", "0.5"])
    assert rc == 2 and "2 weights for 1 bases" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--base", str(tiny_sdxl.single_file)])
    assert e.value.code == 2
    (work / "typo.toml").write_text('out = "x.safetensors"\nbase = ["a"]\nlokrr = ["l"]\n')
    assert main(["--recipe", str(work / "typo.toml")]) == 2
    assert "unknown recipe key 'lokrr'" in capsys.readouterr().err
    assert "w.safetensors" not in files_in(work)


def test_command_line_overrides_recipe_values(tiny_sdxl, work):
    (work / "o.toml").write_text(f'out = "o.safetensors"\nbase = ["{tiny_sdxl.single_file}"]\ndtype = "fp32"\n')
    r = load_recipe(work / "o.toml", dtype="fp16", overwrite=True)
    assert r.dtype == torch.float16 and r.overwrite and r.out == work / "o.safetensors"
    assert r.bases == (tiny_sdxl.single_file,)


def test_lokr_specs_and_recipe_round_trip(tmp_path):
    assert LoKrInput.parse("a/b.safetensors") == LoKrInput(Path("a/b.safetensors"), 1.0)
    assert LoKrInput.parse("a/b.safetensors:0.5") == LoKrInput(Path("a/b.safetensors"), 0.5)
    assert LoKrInput.parse("a/b.safetensors:-1e-1") == LoKrInput(Path("a/b.safetensors"), -0.1)
    assert LoKrInput.parse("C:/x/b.safetensors") == LoKrInput(Path("C:/x/b.safetensors"), 1.0)  # a drive, not a multiplier
    with pytest.raises(ConfigError):
        LoKrInput.parse("b.safetensors:inf")
    r = Recipe(out=tmp_path / "o.safetensors", bases=[tmp_path / "a", tmp_path / "b"], weights=[0.5, 0.5],
               restore_embeddings=tmp_path / "r", lokrs=[f"{tmp_path / 'l'}:0.25"], dtype="bf16", skip_unmatched=True,
               hash_inputs=True, title="x")
    (tmp_path / "r.toml").write_text(recipe_to_toml(r))
    assert load_recipe(tmp_path / "r.toml") == r


def test_merge_imports_no_networks(tiny_sdxl, work):
    """The merge runs on name tables only: diffusers and transformers are never imported."""
    code = (
        "import sys\n"
        "from lokr_trainer.merge.__main__ import main\n"
        f"rc = main(['--out', {str(work / 'light.safetensors')!r}, '--base', {str(tiny_sdxl.diffusers_dir)!r},"
        f" '--lokr', {str(work / 'l.safetensors')!r}, '--no-progress'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers', 'lycoris', 'accelerate'))\n"
        "print('HEAVY', heavy)\n"
        "sys.exit(rc)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "HEAVY []" in p.stdout, p.stdout
    meta = read_all(work / "light.safetensors")[1]
    assert json.loads(meta["lokr_trainer.merge"])["bases"][0]["format"] == "diffusers"


def test_hostile_inputs_get_one_line_exit_2_and_the_right_cause(tiny_sdxl, tmp_path, capsys):
    """No traceback: each bad input names the file and what is wrong with it."""
    import torch
    from safetensors.torch import save_file

    base = str(tiny_sdxl.single_file)
    lokr = tmp_path / "x.safetensors"
    save_file({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lokr_w1": torch.ones(2, 2),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lokr_w2": torch.ones(32, 32)}, str(lokr))
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(64, 4),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 64)}, str(lora))
    r1 = tmp_path / "r1.toml"
    r1.write_text(f'out = "o.safetensors"\nbase = ["{base}"]\nworkers = "two"\n')
    r2 = tmp_path / "r2.toml"
    r2.write_text('out = "o.safetensors"\nbase = 5\n')
    out = str(tmp_path / "o.safetensors")
    cases = [
        (["--base", base, "--lokr", f"{lokr}:nan", "--out", out], "nan is not finite"),
        (["--base", base, "--lokr", f"{lokr}:abc", "--out", out], "the multiplier 'abc' after ':' is not a number"),
        (["--base", base, "--lokr", str(lora), "--out", out], "is a LoRA (lora_up/lora_down), not a LoKr"),
        (["--base", base, "--lokr", base, "--out", out], "is a model checkpoint, not a LoKr adapter (pass it as --base)"),
        (["--recipe", str(r1)], f"{r1}: workers must be a whole number"),
        (["--recipe", str(r2)], f"{r2}: base must be a path or a list of paths, got 5"),
        (["--recipe", str(tmp_path)], "is a folder; --recipe takes a .toml recipe file"),
    ]
    for argv, expect in cases:
        rc = main(argv + (["--no-progress"] if "--recipe" not in argv else []))
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert expect in err and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "o.safetensors").exists()
