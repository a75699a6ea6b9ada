"""The training engine on the tiny SDXL: determinism, layout independence, exact resume, failures.

Every run here is a real ``Trainer.fit`` on the tiny fixture (CPU, fp32), so
the properties hold for the code path a real run takes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lokr_trainer.config import RunConfig, load_config, save_config
from lokr_trainer.errors import TrainingError
from lokr_trainer.testing import make_tiny_dataset
from lokr_trainer.train.checkpoint import list_states, load_state
from lokr_trainer.train.loop import Trainer, TrainerHooks


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    # 8 images: 4 square, 2 landscape, 2 portrait -> 3 buckets at resolution 64
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), n=8, seed=0)


def config(tiny_sdxl, images: Path, out: Path, **tables) -> RunConfig:
    d = {
        "model": {"path": str(tiny_sdxl.single_file)},
        "lokr": {"preset": "kohaku-xl-delta"},
        "data": {
            "path": [str(images)],
            "resolution": 64,
            "min_bucket": 32,
            "max_bucket": 128,
            "bucket_step": 16,
            "num_workers": 0,
        },
        "caption": {"shuffle_general": True, "tag_dropout": 0.1},
        "diffusion": {"min_snr_gamma": 5.0},
        "optimizer": {"name": "adamw", "unet_lr": 1e-3, "te1_lr": 5e-4, "te2_lr": 5e-4, "weight_decay": 0.01},
        "scheduler": {"name": "constant_with_warmup", "warmup_steps": 2},
        "train": {"output_dir": str(out), "seed": 1, "batch_size": 2, "max_steps": 4,
                  "save_dtype": "fp32", "log_every": 1},
    }
    for table, values in tables.items():
        d.setdefault(table, {}).update(values)
    return RunConfig.from_dict(d)


#: kohaku-xl-delta without the tiny UNet's degenerate ResNet time projections (see the layout test)
NO_EMB = {"preset": "kohaku-xl-delta", "exclude": ["*emb_layers*"]}


def fit(cfg: RunConfig, **kw):
    trainer = Trainer(cfg, progress=False, **kw)
    return trainer, trainer.fit()


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    worst = 0.0
    for k in a:
        scale = a[k].abs().max().item()
        if scale > 0:
            worst = max(worst, (a[k] - b[k]).abs().max().item() / scale)
    return worst


def global_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """‖a − b‖ / ‖a‖ over all adapter tensors (per-element ratios are meaningless under Adam, see below)."""
    assert set(a) == set(b)
    num = sum(((a[k] - b[k]).double() ** 2).sum() for k in a)
    den = sum((a[k].double() ** 2).sum() for k in a)
    return float((num / den).sqrt())


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# ----------------------------------------------------------------------------- basics


def test_same_seed_twice_gives_identical_adapter_bytes_and_the_adapter_learns(tiny_sdxl, tiny_data, tmp_path):
    _, r1 = fit(config(tiny_sdxl, tiny_data, tmp_path / "a"))
    _, r2 = fit(config(tiny_sdxl, tiny_data, tmp_path / "b"))
    a, b = adapter_tensors(r1.adapter), adapter_tensors(r2.adapter)
    assert_bit_identical(a, b)
    # the W2 factors start at zero; after training they must not be
    assert any(k.endswith("lokr_w2") and v.abs().max() > 0 for k, v in a.items())
    assert r1.steps_done == 4 and len(r1.losses) == 4
    # another seed gives another run
    _, r3 = fit(config(tiny_sdxl, tiny_data, tmp_path / "c", train={"seed": 2}))
    assert max_rel_diff(a, adapter_tensors(r3.adapter)) > 1e-3


def test_outputs_metadata_and_resolved_config_reproduce_the_run(tiny_sdxl, tiny_data, tmp_path):
    cfg = config(tiny_sdxl, tiny_data, tmp_path / "run", train={"save_every": 2, "keep_last": 1})
    trainer, result = fit(cfg)
    out = tmp_path / "run"
    assert (out / "config.toml").is_file() and (out / "lokr.safetensors").is_file()
    assert sorted(p.name for p in out.glob("lokr-step-*.safetensors")) == ["lokr-step-000002.safetensors"]
    assert [s for s, _ in list_states(out / "state")] == [4]  # keep_last = 1
    assert list((out / "logs").glob("events.out.tfevents.*"))
    with safe_open(str(result.adapter), "pt") as f:
        meta = f.metadata()
    import json

    assert json.loads(meta["lokr_trainer.config"]) == trainer.effective_config.to_dict()
    assert meta["lokr_trainer.step"] == "4" and meta["lokr_trainer.images_seen"] == str(4 * 2)
    assert len(meta["lokr_trainer.base_model_sha256"]) == 64 and len(meta["lokr_trainer.data_digest"]) == 64
    assert meta["ss_network_module"] == "lycoris.kohya"
    # training again from the written config.toml gives the same bytes
    again = load_config(out / "config.toml", [f"train.output_dir={tmp_path / 'again'}"])
    _, r2 = fit(again)
    assert_bit_identical(adapter_tensors(result.adapter), adapter_tensors(r2.adapter))


# ----------------------------------------------------------------------------- layout independence


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_accumulation_equal_bigger_batch(tiny_sdxl, tiny_data, tmp_path):
    """Global batch 4 three ways; 5 steps cross an epoch boundary (3 steps per epoch) and use padded steps.

    The layouts cannot be bit-equal (BLAS picks other kernels for other batch
    sizes: the tiny UNet's forward differs by ~1e-6 between batch 2 and 4), so
    the check is ‖Δ‖/‖w‖ ≤ 1e-6 over the adapter.  The tiny UNet's ResNet
    time projections (``emb_layers``) are left out: with 32 channels in 32
    groups, GroupNorm removes the per-channel shift they add, their true
    gradient is exactly zero, and Adam turns the rounding noise in it into
    full-size, layout-dependent steps.  Real SDXL (10 channels per group) has
    no such layers.
    """
    common = {"max_steps": 5, "seed": 3}
    opt = {"name": "adamw"}
    lokr = NO_EMB
    accum = config(tiny_sdxl, tiny_data, tmp_path / "accum", train={**common, "batch_size": 2, "grad_accum": 2}, optimizer=opt, lokr=lokr)
    big = config(tiny_sdxl, tiny_data, tmp_path / "big", train={**common, "batch_size": 4, "grad_accum": 1}, optimizer=opt, lokr=lokr)
    ddp = config(tiny_sdxl, tiny_data, tmp_path / "ddp", train={**common, "batch_size": 2, "global_batch": 4}, optimizer=opt, lokr=lokr)
    cfg_file = save_config(ddp, tmp_path / "ddp.toml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        "-m", "lokr_trainer.train", "--config", str(cfg_file), "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global batch 4 = batch 2 x accumulation 1 x processes 2" in proc.stdout
    _, ra = fit(accum)
    _, rb = fit(big)
    a, b = adapter_tensors(ra.adapter), adapter_tensors(rb.adapter)
    d = adapter_tensors(tmp_path / "ddp" / "lokr.safetensors")
    assert global_rel_diff(a, b) < 1e-6
    assert global_rel_diff(a, d) < 1e-6
    w2 = {k: v for k, v in a.items() if k.endswith("lokr_w2")}
    last_te1 = {k for k in w2 if k.startswith("lora_te1_text_model_encoder_layers_2_")}  # no gradient: frozen
    assert len(last_te1) == 6 and all(w2[k].abs().max() == 0 for k in last_te1)
    assert all(v.abs().max() > 0 for k, v in w2.items() if k not in last_te1)  # every other W2 moved off zero
    # and the check is sensitive: a different global batch is a different run
    _, rc = fit(config(tiny_sdxl, tiny_data, tmp_path / "g2", train={**common, "batch_size": 2}, optimizer=opt, lokr=lokr))
    assert global_rel_diff(a, adapter_tensors(rc.adapter)) > 1e-4


# ----------------------------------------------------------------------------- exact resume


@pytest.fixture(scope="module")
def straight_runs(tiny_sdxl, tiny_data, tmp_path_factory):
    """6 straight steps per optimizer (global batch 2: 4 steps per epoch, so step 6 is in epoch 2)."""
    out = {}
    for name in ("adamw", "lion8bit"):
        root = tmp_path_factory.mktemp(f"straight_{name}")
        _, r = fit(config(tiny_sdxl, tiny_data, root, train={"max_steps": 6}, optimizer={"name": name}))
        out[name] = adapter_tensors(r.adapter)
    return out


@pytest.mark.parametrize(
    "optimizer,how,at",
    [("adamw", "stop_after", 3), ("adamw", "signal", 4), ("lion8bit", "stop_after", 4), ("lion8bit", "signal", 3)],
)
def test_resume_is_bit_identical_to_a_straight_run(tiny_sdxl, tiny_data, tmp_path, straight_runs, optimizer, how, at):
    out = tmp_path / "run"
    train = {"max_steps": 6}
    hooks = None
    if how == "stop_after":
        train["stop_after"] = at
    else:
        def send_sigint(step, micro, loss):  # arrives in the middle of step `at`
            if step == at - 1 and micro == 0:
                os.kill(os.getpid(), signal.SIGINT)
            return loss

        hooks = TrainerHooks(loss=send_sigint)
    cfg = config(tiny_sdxl, tiny_data, out, train=train, optimizer={"name": optimizer})
    _, first = fit(cfg, hooks=hooks)
    assert first.stopped == how and first.adapter is None
    assert [s for s, _ in list_states(out / "state")] == [at]
    cfg2 = config(tiny_sdxl, tiny_data, out, train={"max_steps": 6}, optimizer={"name": optimizer})
    _, second = fit(cfg2, resume="latest")
    assert second.start_step == at and second.steps_done == 6 - at and second.stopped == "done"
    assert_bit_identical(straight_runs[optimizer], adapter_tensors(second.adapter))


def test_ctrl_c_in_the_last_step_or_during_the_final_save_still_writes_the_final_adapter(
    tiny_sdxl, tiny_data, tmp_path, straight_runs, monkeypatch
):
    """Once the last step runs there is no step boundary left to stop at: the run finishes.

    Before, a signal in step 6 of 6 saved a state and no lokr.safetensors, and the resume
    then said "already complete" and never wrote it.
    """
    def send_sigint(step, micro, loss):
        if step == 5 and micro == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    cfg = config(tiny_sdxl, tiny_data, tmp_path / "last", train={"max_steps": 6}, optimizer={"name": "adamw"})
    _, r = fit(cfg, hooks=TrainerHooks(loss=send_sigint))
    assert r.stopped == "done" and r.adapter is not None
    assert_bit_identical(straight_runs["adamw"], adapter_tensors(r.adapter))

    # a signal while the final files are written: deferred, the save completes
    real = Trainer._save_state

    def signalled_save(self, run, step):
        os.kill(os.getpid(), signal.SIGINT)
        return real(self, run, step)

    monkeypatch.setattr(Trainer, "_save_state", signalled_save)
    cfg = config(tiny_sdxl, tiny_data, tmp_path / "save", train={"max_steps": 6}, optimizer={"name": "adamw"})
    _, r = fit(cfg)
    assert r.stopped == "done"
    assert_bit_identical(straight_runs["adamw"], adapter_tensors(r.adapter))


def test_a_finished_run_whose_final_adapter_is_missing_writes_it_on_resume(tiny_sdxl, tiny_data, tmp_path, straight_runs):
    out = tmp_path / "run"
    cfg = config(tiny_sdxl, tiny_data, out, train={"max_steps": 6}, optimizer={"name": "adamw"})
    fit(cfg)
    (out / "lokr.safetensors").unlink()  # e.g. killed while writing it, after the last state
    _, r = fit(cfg, resume="latest")
    assert (r.start_step, r.steps_done, r.stopped) == (6, 0, "done")
    assert_bit_identical(straight_runs["adamw"], adapter_tensors(out / "lokr.safetensors"))
    assert [s for s, _ in list_states(out / "state")] == [6]


def test_resume_refuses_a_config_that_changes_the_run(tiny_sdxl, tiny_data, tmp_path):
    from lokr_trainer.errors import ConfigError

    out = tmp_path / "run"
    fit(config(tiny_sdxl, tiny_data, out, train={"max_steps": 4, "stop_after": 2}))
    changed = config(tiny_sdxl, tiny_data, out, train={"max_steps": 4, "seed": 9}, optimizer={"unet_lr": 5e-4})
    with pytest.raises(ConfigError, match=r"optimizer\.unet_lr: 0\.001 -> 0\.0005; train\.seed: 1 -> 9"):
        fit(changed, resume="latest")
    # without --resume an output_dir holding a run is not overwritten
    with pytest.raises(ConfigError, match="already holds a run"):
        fit(config(tiny_sdxl, tiny_data, out, train={"max_steps": 4}))
    # a different split of the same global batch may resume (2 x 1 -> 1 x 2)
    split = config(tiny_sdxl, tiny_data, out, train={"max_steps": 4, "batch_size": 1, "grad_accum": 2})
    _, r = fit(split, resume="latest")
    assert r.start_step == 2 and r.stopped == "done"


# ----------------------------------------------------------------------------- failures


def test_nan_loss_is_skipped_and_counted_and_too_many_stop_with_the_last_good_state(tiny_sdxl, tiny_data, tmp_path):
    snapshots = {}

    def nan_at_step_2(step, micro, loss):
        return loss * float("nan") if step == 1 else loss

    def snap(trainer, step):
        snapshots[step] = {k: v.detach().clone() for k, v in trainer.network.state_dict().items()}

    _, r = fit(config(tiny_sdxl, tiny_data, tmp_path / "a"), hooks=TrainerHooks(loss=nan_at_step_2, after_step=snap))
    assert r.skipped_steps == 1 and r.stopped == "done"
    assert not torch.isfinite(torch.tensor(r.losses[1])) and all(torch.isfinite(torch.tensor(r.losses[i])) for i in (0, 2, 3))
    assert_bit_identical(snapshots[1], snapshots[2])  # the NaN step changed nothing
    assert max_rel_diff(snapshots[2], snapshots[3]) > 0
    assert all(torch.isfinite(t).all() for t in adapter_tensors(r.adapter).values())

    def nan_from_step_3(step, micro, loss):
        return loss * float("nan") if step >= 2 else loss

    out = tmp_path / "b"
    cfg = config(tiny_sdxl, tiny_data, out, train={"max_steps": 8, "save_every": 2, "max_bad_steps": 3})
    with pytest.raises(TrainingError, match=r"3 non-finite steps in a row.*step-000002"):
        fit(cfg, hooks=TrainerHooks(loss=nan_from_step_3))
    assert [s for s, _ in list_states(out / "state")] == [2]
    assert all(torch.isfinite(t).all() for t in load_state(out / "state" / "step-000002")["adapter"].values())


def test_a_failed_or_killed_save_leaves_the_previous_state_loadable(tiny_sdxl, tiny_data, tmp_path, monkeypatch):
    import lokr_trainer.train.checkpoint as ckpt

    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # second state (step 4): optimizer.pt written, misc.pt fails
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", flaky_save)
    cfg = config(tiny_sdxl, tiny_data, out, train={"max_steps": 6, "save_every": 2})
    with pytest.raises(OSError, match="No space left"):
        fit(cfg)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert [s for s, _ in list_states(out / "state")] == [2]
    assert not list((out / "state").glob(".*tmp*"))
    # a kill (no cleanup) leaves a temp folder: it is ignored, and removed by the next save
    debris = out / "state" / ".step-000004.tmp-999999"
    shutil.copytree(out / "state" / "step-000002", debris)
    (debris / "trainer.json").unlink()
    assert [s for s, _ in list_states(out / "state")] == [2]
    _, r = fit(config(tiny_sdxl, tiny_data, out, train={"max_steps": 6, "save_every": 2}), resume="latest")
    assert r.start_step == 2 and r.stopped == "done" and not debris.exists()


# ----------------------------------------------------------------------------- bake, frozen text encoders


def test_final_adapter_bakes_with_the_merge_cli_into_the_trained_model(tiny_sdxl, tiny_data, tmp_path):
    from lokr_trainer.merge.__main__ import main as merge_main
    from lokr_trainer.sdxl import load_sdxl

    trainer, r = fit(config(tiny_sdxl, tiny_data, tmp_path / "run", optimizer={"unet_lr": 1e-2, "te1_lr": 1e-2, "te2_lr": 1e-2}))
    baked = tmp_path / "baked.safetensors"
    assert merge_main(["--base", str(tiny_sdxl.single_file), "--lokr", str(r.adapter), "--out", str(baked),
                       "--dtype", "fp32", "--no-progress"]) == 0
    merged = load_sdxl(baked)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 7, 64, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
    t = torch.tensor([10, 700])
    ids_txt = torch.randint(0, 49406, (2, 77), generator=g)
    trained = trainer.models
    for m in (trained.unet, trained.text_encoder, trained.text_encoder_2):
        m.eval()
    with torch.no_grad():
        kw = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
        a = trained.unet(x, t, ctx, **kw).sample
        b = merged.unet(x, t, ctx, **kw).sample
        base = load_sdxl(tiny_sdxl.single_file)
        c = base.unet(x, t, ctx, **kw).sample
        te_a = trained.text_encoder_2(ids_txt, output_hidden_states=True).hidden_states[-2]
        te_b = merged.text_encoder_2(ids_txt, output_hidden_states=True).hidden_states[-2]
    assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item())
    assert (te_a - te_b).abs().max().item() <= 1e-5 * max(1.0, te_a.abs().max().item())
    assert (a - c).abs().max().item() > 1e-4  # training changed the model, so the check is not vacuous


def test_frozen_text_encoders_train_and_save_unet_modules_only_with_the_text_cache(tiny_sdxl, tiny_data, tmp_path):
    out = tmp_path / "run"
    cfg = config(
        tiny_sdxl, tiny_data, out,
        train={"train_text_encoders": False},
        data={"cache_text": True, "cache_latents": True},
        caption={"shuffle_general": False, "tag_dropout": 0.0},
        lokr=NO_EMB,
    )
    trainer, r = fit(cfg)
    keys = set(adapter_tensors(r.adapter))
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert list((out / "cache" / "text").rglob("*.safetensors")) and list((out / "cache" / "latents").rglob("*.safetensors"))
    assert trainer.effective_config.lokr.components == ("unet",)
    # the cached run equals the uncached one (the cache stores exactly what the encoders give)
    cfg2 = config(
        tiny_sdxl, tiny_data, tmp_path / "nocache",
        train={"train_text_encoders": False},
        caption={"shuffle_general": False, "tag_dropout": 0.0},
        lokr=NO_EMB,
    )
    _, r2 = fit(cfg2)
    assert global_rel_diff(adapter_tensors(r.adapter), adapter_tensors(r2.adapter)) < 1e-6


def test_gradient_checkpointing_trains_the_same_adapter(tiny_sdxl, tiny_data, tmp_path):
    _, plain = fit(config(tiny_sdxl, tiny_data, tmp_path / "plain", lokr=NO_EMB))
    _, gc = fit(config(tiny_sdxl, tiny_data, tmp_path / "gc", lokr=NO_EMB, train={"gradient_checkpointing": True}))
    assert global_rel_diff(adapter_tensors(plain.adapter), adapter_tensors(gc.adapter)) < 1e-6


@pytest.mark.parametrize("delay", [0.0, 0.3], ids=["as-the-summary-prints", "during-training"])
def test_sigint_to_a_real_process_at_an_arbitrary_moment_then_resume(tiny_sdxl, tiny_data, tmp_path, straight_runs, delay):
    """Ctrl-C while the CLI trains: it saves a state at the next step boundary, exits 0, and resumes exactly.

    From the moment the summary is on screen Ctrl-C is handled: delay 0 sends it as
    the summary's last line arrives (once a KeyboardInterrupt traceback, a lost run).
    """
    import time

    out = tmp_path / "run"
    cfg = config(tiny_sdxl, tiny_data, out, train={"max_steps": 6, "log_every": 1}, optimizer={"name": "adamw"})
    cfg_file = save_config(cfg, tmp_path / "run.toml")
    # same thread count as this process: the straight run it is compared with ran here
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lokr_trainer.train", "--config", str(cfg_file), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    # wait until training has begun (the summary is printed right before the first step), then interrupt
    for line in proc.stdout:
        if line.startswith("  outputs"):
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == 0, rest
    states = [s for s, _ in list_states(out / "state")]
    if "interrupted after step" in rest:
        assert len(states) == 1 and 1 <= states[0] <= 6
    else:  # the signal came after the last step: the run simply finished
        assert states == [6]
    _, r = fit(config(tiny_sdxl, tiny_data, out, train={"max_steps": 6, "log_every": 1}, optimizer={"name": "adamw"}), resume="latest")
    final = r.adapter if r.adapter is not None else out / "lokr.safetensors"
    assert_bit_identical(straight_runs["adamw"], adapter_tensors(final))


def test_resuming_a_finished_run_says_so_without_loading_the_model(tiny_sdxl, tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _, first = fit(config(tiny_sdxl, tiny_data, out, train={"max_steps": 2}))
    before = first.adapter.read_bytes()

    def no_model(self):
        raise AssertionError("the model was loaded for a run with no step left")

    monkeypatch.setattr(Trainer, "_load_models", no_model)
    capsys.readouterr()
    _, again = fit(config(tiny_sdxl, tiny_data, out, train={"max_steps": 2}), resume="latest")
    assert (again.start_step, again.steps_done, again.total_steps) == (2, 0, 2)
    assert again.adapter == out / "lokr.safetensors" and again.adapter.read_bytes() == before
    assert capsys.readouterr().out.strip().splitlines()[-1] == "the run is already complete (2/2 steps); nothing to do"


def test_ctrl_c_before_training_begins_is_one_line_and_exit_130(tiny_sdxl, tiny_data, tmp_path, monkeypatch, capsys):
    """An interrupt while the model loads or the caches fill: no traceback, no state, exit 130."""
    from lokr_trainer.train import __main__ as cli

    def interrupted_setup(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_setup", interrupted_setup)
    cfg_file = save_config(config(tiny_sdxl, tiny_data, tmp_path / "run"), tmp_path / "run.toml")
    assert cli.main(["--config", str(cfg_file), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run" / "state").exists()


def test_tar_shards_read_in_place_train_the_same_adapter_as_compressed_ones(tiny_sdxl, tiny_data, tmp_path):
    """Local .tar members are read where they lie (no image bytes in the index); a .tar.gz copy of the
    same shards holds the bytes in memory: the runs, data workers included, are bit-identical."""
    import gzip
    import tarfile

    pytest.importorskip("webdataset")
    images = sorted(tiny_data.glob("*.png"))
    for s in range(2):  # two shards of four samples (image + caption)
        with tarfile.open(tmp_path / f"{s:06d}.tar", "w") as tar:
            for img in images[4 * s : 4 * s + 4]:
                tar.add(img, arcname=img.name)
                tar.add(img.with_suffix(".txt"), arcname=img.with_suffix(".txt").name)
        (tmp_path / f"{s:06d}.tar.gz").write_bytes(gzip.compress((tmp_path / f"{s:06d}.tar").read_bytes()))
    runs = {}
    for kind, workers in (("tar", 2), ("tar.gz", 0)):
        cfg = config(tiny_sdxl, tiny_data, tmp_path / kind, lokr=NO_EMB)
        cfg = RunConfig.from_dict({**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "num_workers": workers,
                                                             "path": [str(tmp_path / f"{{000000..000001}}.{kind}")]}})
        trainer, runs[kind] = fit(cfg)
        assert runs[kind].steps_done == 4 and runs[kind].skipped_images == 0
    assert_bit_identical(adapter_tensors(runs["tar"].adapter), adapter_tensors(runs["tar.gz"].adapter))
    meta = [safe_open(str(r.adapter), "pt").metadata()["lokr_trainer.data_digest"] for r in runs.values()]
    assert meta[0] == meta[1]


def test_data_workers_do_not_change_the_run(tiny_sdxl, tiny_data, tmp_path):
    _, r0 = fit(config(tiny_sdxl, tiny_data, tmp_path / "w0", data={"num_workers": 0}))
    _, r2 = fit(config(tiny_sdxl, tiny_data, tmp_path / "w2", data={"num_workers": 2}))
    assert_bit_identical(adapter_tensors(r0.adapter), adapter_tensors(r2.adapter))


def test_an_image_that_breaks_during_training_is_skipped_logged_and_counted(tiny_sdxl, tiny_data, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    victim = data / "img_000.png"
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) // 2])  # the header (and size) still reads; the pixels do not
    with caplog.at_level("WARNING"):
        _, r = fit(config(tiny_sdxl, data, tmp_path / "run", train={"max_steps": 8}))
    assert r.stopped == "done" and r.skipped_images == 1 and r.skipped_steps == 0
    assert any(str(victim) in m for m in caplog.messages)
    assert all(torch.isfinite(t).all() for t in adapter_tensors(r.adapter).values())


def test_fp16_with_grad_scaler_resumes_bit_identically(tiny_sdxl, tiny_data, tmp_path):
    """fp16 base + fp16 autocast. On CPU accelerate runs fp16 without a GradScaler (on CUDA it adds one, and
    the state then carries its scale); the fp16 path itself must still resume exactly."""
    fp16 = {"mixed_precision": "fp16", "max_steps": 6}
    _, straight = fit(config(tiny_sdxl, tiny_data, tmp_path / "straight", model={"dtype": "fp16"}, train=fp16))
    out = tmp_path / "run"
    _, first = fit(config(tiny_sdxl, tiny_data, out, model={"dtype": "fp16"}, train={**fp16, "stop_after": 3}))
    assert first.stopped == "stop_after"
    _, second = fit(config(tiny_sdxl, tiny_data, out, model={"dtype": "fp16"}, train=fp16), resume="latest")
    a, b = adapter_tensors(straight.adapter), adapter_tensors(second.adapter)
    assert all(v.dtype == torch.float32 for v in a.values())  # adapters stay fp32 over an fp16 base
    assert_bit_identical(a, b)
