"""``python -m lokr_trainer.train``: bad configs and inputs fail in one line, exit 2, before any model loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lokr_trainer.train.__main__ import main

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.toml"


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    import lokr_trainer.sdxl as sdxl
    import lokr_trainer.sdxl.load as load

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(sdxl, "load_sdxl", boom)
    monkeypatch.setattr(load, "load_sdxl", boom)


@pytest.fixture
def paths(tiny_sdxl, tmp_path):
    from lokr_trainer.testing import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    return {"model": tiny_sdxl.single_file, "data": data, "empty": empty, "out": tmp_path / "out"}


def run_main(capsys, *overrides: str) -> tuple[int, str]:
    argv = ["--config", str(DEMO), "--no-progress"]
    for o in overrides:
        argv += ["--set", o]
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


def ok_paths(paths) -> list[str]:
    return [f"model.path={paths['model']}", f"data.path={paths['data']}", f"validation.path={paths['data']}",
            f"train.output_dir={paths['out']}"]


@pytest.mark.parametrize(
    "overrides,expect",
    [
        (["train.sead=1"], "unknown key train.sead (did you mean train.seed?)"),
        (["train.seed=abc"], "train.seed"),
        (["optimizer.name=sgd"], "optimizer.name"),
        (["train.max_steps=-1"], "train.max_steps"),
        (["data.prompt_layout=a1111"], "data.prompt_layout"),
        (["train.global_batch=8"], "train.grad_accum"),  # both given: one follows from the other
    ],
)
def test_bad_values_exit_2_with_one_line_naming_the_key(capsys, paths, no_model_load, overrides, expect):
    rc, err = run_main(capsys, *ok_paths(paths), *overrides)
    assert rc == 2, err
    assert expect in err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_global_batch_that_does_not_divide_is_refused(capsys, paths, no_model_load):
    from lokr_trainer.config import load_config

    text = load_config(DEMO, ok_paths(paths)).to_toml()
    assert "grad_accum = 2\n" in text and "batch_size = 2\n" in text
    bad = paths["out"].parent / "bad.toml"
    bad.write_text(text.replace("grad_accum = 2\n", "global_batch = 10\n").replace("batch_size = 2\n", "batch_size = 4\n"))
    rc = main(["--config", str(bad), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "global_batch" in err and "10" in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("which", ["model", "data", "empty"])
def test_missing_model_missing_data_and_empty_folder(capsys, paths, no_model_load, which):
    over = ok_paths(paths)
    if which == "model":
        over[0] = f"model.path={paths['out'].parent / 'nope.safetensors'}"
        expect = "model.path: "
    elif which == "data":
        over[1] = f"data.path={paths['out'].parent / 'no_such_folder'}"
        expect = "data.path: "
    else:
        over[1] = f"data.path={paths['empty']}"
        expect = f"{paths['empty']}: no images found"
    rc, err = run_main(capsys, *over)
    assert rc == 2, err
    assert expect in err and err.count("\n") == 1 and "Traceback" not in err


def test_settings_that_cannot_work_together_are_named_before_missing_files(capsys, paths, no_model_load):
    """A recipe tried before its model is downloaded still reports the settings mistake first."""
    rc, err = run_main(capsys, f"model.path={paths['out'].parent / 'not_downloaded.safetensors'}",
                       "data.path=[\"no_such_folder\"]", "model.dtype=fp16", "train.mixed_precision=no")
    assert rc == 2 and err.startswith("error: model.dtype = 'fp16' needs train.mixed_precision"), err


def test_real_process_exit_code_and_no_traceback(paths):
    proc = subprocess.run(
        [sys.executable, "-m", "lokr_trainer.train", "--config", str(DEMO), "--set", "lokr.factr=4"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "lokr.factr" in proc.stderr and "lokr.factor" in proc.stderr and "Traceback" not in proc.stderr
