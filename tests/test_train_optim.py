"""Optimizers (8-bit and 32-bit, on CPU), our Lion vs bitsandbytes', LR schedules, resume round-trips."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lokr_trainer.errors import ConfigError
from lokr_trainer.train.optim import (
    OPTIMIZERS,
    Lion,
    build_optimizer,
    build_scheduler,
    lr_multiplier,
    optimizer_state_bytes,
)

REPO = Path(__file__).resolve().parents[1]
LRS = {"unet": 1e-3, "te1": 2e-4, "te2": 5e-5}
# unet: above bitsandbytes' 4096-element threshold, so it gets 8-bit (blockwise) state
SHAPES = {"unet": (96, 64), "te1": (10, 10), "te2": (5000,)}


def make_params(seed: int = 0) -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for k, s in SHAPES.items()}


def groups_of(params: dict[str, torch.nn.Parameter]) -> list[dict]:
    return [{"params": [p], "lr": LRS[k], "name": k} for k, p in params.items()]


def set_grads(params: dict[str, torch.nn.Parameter], step: int) -> None:
    """A deterministic, state-dependent 'gradient' (no global RNG)."""
    g = torch.Generator().manual_seed(1000 + step)
    for p in params.values():
        p.grad = torch.sin(3.0 * p.detach()) + 0.5 * torch.randn(p.shape, generator=g)


def run_steps(opt, sched, params, start: int, stop: int) -> None:
    for s in range(start, stop):
        set_grads(params, s)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()


# -- building and stepping -----------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_steps_with_three_groups_keeping_lrs(name):
    params = make_params()
    before = {k: p.detach().clone() for k, p in params.items()}
    opt = build_optimizer(name, groups_of(params), weight_decay=0.1, betas=(0.9, 0.95))
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == list(LRS.items())
    assert all(g["weight_decay"] == 0.1 and tuple(g["betas"]) == (0.9, 0.95) for g in opt.param_groups)
    run_steps(opt, None, params, 0, 3)
    for k, p in params.items():
        assert torch.isfinite(p).all()
        assert not torch.equal(p.detach(), before[k]), k
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == list(LRS.items())
    assert optimizer_state_bytes(opt) > 0


def test_groups_from_a_lokr_network(tiny_models):
    from lokr_trainer.lokr.attach import attach_lokr
    from lokr_trainer.lokr.targets import LoKrConfig

    models = SimpleNamespace(
        unet=copy.deepcopy(tiny_models.unet),
        text_encoder=copy.deepcopy(tiny_models.text_encoder),
        text_encoder_2=copy.deepcopy(tiny_models.text_encoder_2),
    )
    net = attach_lokr(models, LoKrConfig())
    opt = build_optimizer(
        "lion8bit", net.param_groups(unet_lr=1e-4, te1_lr=1e-5, te2_lr=2e-5), weight_decay=0.1, betas=(0.9, 0.95)
    )
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("unet", 1e-4), ("te1", 1e-5), ("te2", 2e-5)]
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    net.remove()


def test_state_bytes_of_adamw_and_lion():
    params = make_params()
    n = sum(p.numel() for p in params.values())
    adamw = build_optimizer("adamw", groups_of(params), weight_decay=0.0, betas=(0.9, 0.999))
    run_steps(adamw, None, params, 0, 1)
    assert optimizer_state_bytes(adamw) == 2 * 4 * n + 3 * 4  # exp_avg, exp_avg_sq (+ a float32 step each)
    lion_params = make_params()
    lion = build_optimizer("lion", groups_of(lion_params), weight_decay=0.0, betas=(0.9, 0.99))
    assert optimizer_state_bytes(lion) == 0
    run_steps(lion, None, lion_params, 0, 1)
    assert optimizer_state_bytes(lion) == 4 * n


def test_errors():
    params = make_params()
    with pytest.raises(ConfigError, match="lion8bit.*adamw8bit.*adamw.*lion"):
        build_optimizer("sgd", groups_of(params), weight_decay=0.0, betas=(0.9, 0.99))
    with pytest.raises(ConfigError, match="betas"):
        build_optimizer("adamw", groups_of(params), weight_decay=0.0, betas=(0.9,))
    with pytest.raises(ConfigError):
        build_optimizer("lion", [], weight_decay=0.0, betas=(0.9, 0.99))


def test_missing_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        build_optimizer("lion8bit", groups_of(make_params()), weight_decay=0.0, betas=(0.9, 0.99))
    # the 32-bit optimizers do not need it
    build_optimizer("lion", groups_of(make_params()), weight_decay=0.0, betas=(0.9, 0.99))


# -- our Lion vs bitsandbytes' 32-bit Lion --------------------------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lion_matches_bitsandbytes_32bit(weight_decay):
    import bitsandbytes as bnb

    ours, theirs = make_params(), make_params()
    opt_a = Lion(groups_of(ours), betas=(0.9, 0.95), weight_decay=weight_decay)
    opt_b = bnb.optim.Lion(groups_of(theirs), betas=(0.9, 0.95), weight_decay=weight_decay)
    for s in range(20):
        run_steps(opt_a, None, ours, s, s + 1)
        run_steps(opt_b, None, theirs, s, s + 1)
    for k in SHAPES:
        torch.testing.assert_close(ours[k].detach(), theirs[k].detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(
            opt_a.state[ours[k]]["exp_avg"], opt_b.state[theirs[k]]["state1"], rtol=0, atol=1e-6
        )


def test_lion_bf16_params_keep_dtype():
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = Lion([{"params": [p], "lr": 0.25, "name": "unet"}], weight_decay=0.0)
    p.grad = torch.tensor([1.0, -1.0] * 4, dtype=torch.bfloat16)
    opt.step()
    assert p.dtype == torch.bfloat16 and p.tolist() == [0.75, 1.25] * 4


# -- resume: state_dict round trips ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["lion8bit", "adamw8bit", "lion", "adamw"])
def test_resume_after_reload_is_bit_identical(name):
    kwargs = {"weight_decay": 0.1, "betas": (0.9, 0.95)}
    sched_kw = {"name": "cosine", "warmup_steps": 3, "total_steps": 12}

    straight = make_params()
    opt = build_optimizer(name, groups_of(straight), **kwargs)
    sched = build_scheduler(opt, **sched_kw)
    run_steps(opt, sched, straight, 0, 12)

    first = make_params()
    opt1 = build_optimizer(name, groups_of(first), **kwargs)
    sched1 = build_scheduler(opt1, **sched_kw)
    run_steps(opt1, sched1, first, 0, 5)
    buf = io.BytesIO()
    torch.save(
        {
            "params": {k: p.detach() for k, p in first.items()},
            "optimizer": opt1.state_dict(),
            "scheduler": sched1.state_dict(),
        },
        buf,
    )
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = {k: torch.nn.Parameter(v.clone()) for k, v in ckpt["params"].items()}
    opt2 = build_optimizer(name, groups_of(resumed), **kwargs)
    sched2 = build_scheduler(opt2, **sched_kw)
    opt2.load_state_dict(ckpt["optimizer"])
    sched2.load_state_dict(ckpt["scheduler"])
    assert [g["name"] for g in opt2.param_groups] == list(LRS)
    run_steps(opt2, sched2, resumed, 5, 12)

    for k in SHAPES:
        assert torch.equal(resumed[k].detach(), straight[k].detach()), k
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_8bit_state_is_really_8bit():
    params = make_params()
    opt = build_optimizer("lion8bit", groups_of(params), weight_decay=0.0, betas=(0.9, 0.99))
    run_steps(opt, None, params, 0, 1)
    assert opt.state[params["unet"]]["state1"].dtype == torch.uint8
    assert opt.state[params["te1"]]["state1"].dtype == torch.float32  # under 4096 elements


# -- LR schedules -----------------------------------------------------------------------------------


def mult(step, name, warmup=4, total=14, min_lr_ratio=0.0):
    return lr_multiplier(step, name=name, warmup_steps=warmup, total_steps=total, min_lr_ratio=min_lr_ratio)


def test_constant_schedules():
    assert [mult(s, "constant") for s in (0, 3, 100)] == [1.0, 1.0, 1.0]
    assert [mult(s, "constant_with_warmup") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [mult(s, "constant_with_warmup", warmup=0) for s in (0, 5)] == [1.0, 1.0]


def test_cosine_schedule_values():
    # warmup 4, then progress = (step - 4) / 10
    got = [mult(s, "cosine") for s in (0, 3, 4, 6, 9, 14, 20)]
    assert got == pytest.approx([0.25, 1.0, 1.0, 0.9045084971874737, 0.5, 0.0, 0.0], abs=1e-12)
    got = [mult(s, "cosine", min_lr_ratio=0.1) for s in (4, 9, 14, 30)]
    assert got == pytest.approx([1.0, 0.55, 0.1, 0.1], abs=1e-12)
    assert mult(0, "cosine", warmup=0, total=0) == 1.0


def test_schedule_errors():
    with pytest.raises(ConfigError, match="constant_with_warmup"):
        mult(0, "linear")
    with pytest.raises(ConfigError):
        mult(0, "cosine", min_lr_ratio=1.5)
    with pytest.raises(ConfigError):
        mult(0, "cosine", warmup=-1)


def test_scheduler_drives_group_lrs_and_round_trips():
    params = make_params()
    opt = build_optimizer("adamw", groups_of(params), weight_decay=0.0, betas=(0.9, 0.999))
    sched = build_scheduler(opt, name="cosine", warmup_steps=4, total_steps=14)
    # the lr of the first optimizer step is base × multiplier(0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([v * 0.25 for v in LRS.values()])
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()

    fresh = build_optimizer("adamw", groups_of(make_params()), weight_decay=0.0, betas=(0.9, 0.999))
    restored = build_scheduler(fresh, name="cosine", warmup_steps=4, total_steps=14)
    restored.load_state_dict(torch.load(_roundtrip(state), weights_only=True))
    assert restored.last_epoch == sched.last_epoch == 7
    assert restored.get_last_lr() == sched.get_last_lr()
    expected = [v * mult(7, "cosine") for v in LRS.values()]
    assert sched.get_last_lr() == pytest.approx(expected)
    sched.step()
    restored.step()
    assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in opt.param_groups]
    assert restored.get_last_lr() == pytest.approx([v * mult(8, "cosine") for v in LRS.values()])


def _roundtrip(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


# -- bitsandbytes' import noise -----------------------------------------------------------------


def test_bitsandbytes_import_noise_is_silenced(capfd):
    """A fresh interpreter (bitsandbytes not yet imported) builds both 8-bit optimizers."""
    code = (
        "import torch\n"
        "from lokr_trainer.train.optim import build_optimizer\n"
        "p = torch.nn.Parameter(torch.zeros(8))\n"
        "for n in ('lion8bit', 'adamw8bit'):\n"
        "    build_optimizer(n, [{'params': [p], 'lr': 1e-3, 'name': 'unet'}], weight_decay=0.0, betas=(0.9, 0.99))\n"
        "print('built')\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=300)
    out, err = capfd.readouterr()
    assert "built" in out
    assert "kernels-community" not in err, err
    # control: does a plain import print the line on this machine? (depends on the CPU's features)
    subprocess.run([sys.executable, "-c", "import bitsandbytes"], cwd=REPO, check=True, timeout=300)
    _, control = capfd.readouterr()
    if "kernels-community" not in control:
        pytest.skip("bitsandbytes prints no kernels-community line on this CPU: nothing was silenced")
