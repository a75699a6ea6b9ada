"""The one writer (``safetensors_io.atomic_output``): permissions, signals, stale temps, OS errors."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from lokr_trainer.errors import CheckpointError, LokrTrainerError, OutputWriteError
from lokr_trainer.safetensors_io import SafetensorsReader, remove_stale_temps, save_tensors

T = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}


def test_outputs_get_umask_permissions_and_an_overwrite_keeps_the_mode(tmp_path):
    old = os.umask(0o022)
    try:
        out = save_tensors(tmp_path / "o.safetensors", T)
        assert stat.S_IMODE(out.stat().st_mode) == 0o644  # not mkstemp's 0600
        os.chmod(out, 0o640)
        save_tensors(out, T, overwrite=True)
        assert stat.S_IMODE(out.stat().st_mode) == 0o640
    finally:
        os.umask(old)
    with SafetensorsReader(out) as r:
        assert torch.equal(r.get("a"), T["a"]) and torch.equal(r.get("b"), T["b"])


def test_refuses_to_overwrite_unless_asked(tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep")
    with pytest.raises(CheckpointError, match="output exists"):
        save_tensors(out, T, overwrite=False)
    assert out.read_bytes() == b"keep"


def test_os_errors_become_one_error_naming_the_path(tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "o.safetensors"  # a part of the path is a file
    with pytest.raises(OutputWriteError) as e:
        save_tensors(out, T)
    assert isinstance(e.value, LokrTrainerError) and isinstance(e.value, OSError)
    assert str(out) in str(e.value) and e.value.errno in (errno.ENOTDIR, errno.EEXIST, errno.EACCES)


def test_no_space_mid_write_is_an_output_error_and_leaves_nothing(tmp_path, monkeypatch):
    import lokr_trainer.safetensors_io as io

    real = io.checked_bytes

    def failing(path, plan, tensors):
        for i, data in enumerate(real(path, plan, tensors)):
            if i == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            yield data

    monkeypatch.setattr(io, "checked_bytes", failing)
    with pytest.raises(OutputWriteError, match="No space left.*free disk space") as e:
        save_tensors(tmp_path / "o.safetensors", T)
    assert e.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    out = tmp_path / "o.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".o.safetensors.{dead_pid}.abc123.tmp"
    live = tmp_path / f".o.safetensors.{os.getppid()}.def456.tmp"
    other = tmp_path / f".other.safetensors.{dead_pid}.x.tmp"
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    remove_stale_temps(out)
    assert not stale.exists() and live.exists() and other.exists()
    save_tensors(out, T)  # the writer does it by itself too
    assert out.exists()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_during_a_write_leave_no_temp_file(tmp_path, sig):
    """A process killed while writing a big output removes its hidden temp file, then dies of the signal."""
    script = textwrap.dedent(f"""
        import sys, time, torch
        from lokr_trainer.safetensors_io import PlannedTensor, write_safetensors
        plan = [PlannedTensor(f"t{{i}}", torch.float32, (1024, 1024)) for i in range(200)]
        def slow():
            for p in plan:
                print("writing", flush=True)
                time.sleep(0.05)
                yield p.name, torch.zeros(p.shape)
        write_safetensors({str(tmp_path / 'big.safetensors')!r}, plan, slow())
    """)
    signum = getattr(signal, sig)  # nohup/background jobs start children with it ignored: model a terminal
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))
    for _ in range(5):
        proc.stdout.readline()  # a few tensors are in the temp file
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    proc.send_signal(getattr(signal, sig))
    rc = proc.wait(timeout=60)
    assert rc == -getattr(signal, sig)  # still dies of the signal
    assert list(tmp_path.iterdir()) == []


def test_save_sdxl_and_save_lokr_refuse_to_overwrite_unless_asked_and_take_dtype_names(tiny_models, tmp_path):
    from lokr_trainer.lokr import LoKrConfig, attach_lokr
    from lokr_trainer.sdxl import load_sdxl, save_sdxl

    out = save_sdxl(tiny_models, tmp_path / "m.safetensors", dtype="bf16")
    with SafetensorsReader(out) as r:
        assert r.header.tensors[next(k for k in r.keys() if k.endswith("to_q.weight"))].dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="output exists"):
        save_sdxl(tiny_models, out)
    save_sdxl(tiny_models, out, dtype="fp16", overwrite=True)
    models = load_sdxl(out)
    net = attach_lokr(models, LoKrConfig.from_preset("attn"))
    lokr = net.save(tmp_path / "a.safetensors", dtype="fp32")
    with pytest.raises(CheckpointError, match="output exists"):
        net.save(lokr)
    with pytest.raises(LokrTrainerError, match="dtype"):
        net.save(tmp_path / "b.safetensors", dtype="int8")


def test_a_diffusers_folder_is_written_whole_or_not_at_all(tiny_models, tmp_path, monkeypatch):
    import lokr_trainer.sdxl.load as load
    from lokr_trainer.sdxl import save_sdxl

    folder = save_sdxl(tiny_models, tmp_path / "pipe", layout="diffusers", dtype="fp32")
    before = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    with pytest.raises(CheckpointError, match="output exists"):
        save_sdxl(tiny_models, folder, layout="diffusers")
    real = load._save_component
    calls = {"n": 0}

    def fail_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(load, "_save_component", fail_on_third)
    with pytest.raises(OutputWriteError, match="No space"):
        save_sdxl(tiny_models, folder, layout="diffusers", overwrite=True)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == before  # the old folder, intact
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]  # no half-written temp folder
    calls["n"] = 0
    with pytest.raises(OutputWriteError):
        save_sdxl(tiny_models, tmp_path / "new_pipe", layout="diffusers")  # a new folder: nothing of it is left
    assert not (tmp_path / "new_pipe").exists()
