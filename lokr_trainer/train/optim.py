"""Optimizers and learning-rate schedules for LoKr training.

* :func:`build_optimizer`: ``lion8bit`` / ``adamw8bit`` (bitsandbytes, imported only when
  chosen, its import-time noise silenced), ``adamw`` (torch), ``lion`` (:class:`Lion`, ours).
* :func:`lr_multiplier` / :func:`build_scheduler`: constant, constant with warmup, cosine;
  counted in *optimizer* steps, so gradient accumulation does not stretch the warmup.
* :func:`optimizer_state_bytes`: the optimizer's memory, for the run summary.

Parameter groups come from ``LoKrNetwork.param_groups`` (keys ``params``, ``lr``, ``name``);
every optimizer here keeps each group's own ``lr`` and ``name``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from lokr_trainer.quiet import quiet_bitsandbytes
from lokr_trainer.errors import ConfigError

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "Lion",
    "build_optimizer",
    "build_scheduler",
    "lr_multiplier",
    "optimizer_state_bytes",
]

OPTIMIZERS = ("lion8bit", "adamw8bit", "adamw", "lion")
SCHEDULES = ("constant", "constant_with_warmup", "cosine")

def _import_bitsandbytes() -> Any:
    """Import bitsandbytes lazily, without its import-time ``kernels-community`` warning."""
    quiet_bitsandbytes()
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as exc:
        raise ConfigError(
            "the 8-bit optimizers need bitsandbytes, which is not installed: "
            "`pip install bitsandbytes` (or choose optimizer 'adamw' or 'lion')"
        ) from exc


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), 32-bit state.

    Per step, with gradient g and momentum m (zero-initialised)::

        p ← p · (1 − lr·wd)                    # decoupled weight decay
        c = β1·m + (1 − β1)·g
        p ← p − lr · sign(c)
        m ← β2·m + (1 − β2)·g

    Written here so that a 32-bit Lion needs no bitsandbytes; the state lives in float32
    whatever the parameter dtype.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-4,
        betas: Sequence[float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        b1, b2 = (float(b) for b in betas)
        if lr < 0 or weight_decay < 0 or not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ConfigError(
                f"Lion needs lr >= 0, weight_decay >= 0 and betas in [0, 1): got {lr}, {weight_decay}, {betas}"
            )
        super().__init__(params, {"lr": lr, "betas": (b1, b2), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            b1, b2 = (float(b) for b in group["betas"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                g = p.grad.float()
                p32 = p.float() if p.dtype != torch.float32 else p
                if wd > 0:
                    p32.mul_(1.0 - lr * wd)
                update = m.mul(b1).add_(g, alpha=1.0 - b1).sign_()
                p32.add_(update, alpha=-lr)
                m.mul_(b2).add_(g, alpha=1.0 - b2)
                if p32 is not p:
                    p.copy_(p32)
        return loss


def _check_groups(param_groups: list[dict]) -> list[dict]:
    if not param_groups:
        raise ConfigError("no parameters to train: the LoKr network has no parameter groups")
    for i, group in enumerate(param_groups):
        if "params" not in group or "lr" not in group:
            raise ConfigError(f"parameter group {i} ({group.get('name', '?')}) needs 'params' and 'lr'")
        lr = float(group["lr"])
        if not math.isfinite(lr) or lr < 0:
            raise ConfigError(f"learning rate of group {group.get('name', i)} must be >= 0, got {group['lr']}")
    return [dict(g) for g in param_groups]


def build_optimizer(
    name: str,
    param_groups: list[dict],
    *,
    weight_decay: float,
    betas: Sequence[float],
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``param_groups``, each group keeping its own ``lr`` and ``name``.

    ``weight_decay`` and ``betas`` are defaults (a group may override them); ``eps`` is used
    by the AdamW variants and ignored by Lion.  bitsandbytes is imported only for the 8-bit
    choices, so the others work without it.
    """
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    betas_t = tuple(float(b) for b in betas)
    if len(betas_t) != 2:
        raise ConfigError(f"optimizer betas must be two numbers, got {list(betas)}")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
    groups = _check_groups(param_groups)
    lr = float(groups[0]["lr"])  # only a default: every group carries its own lr
    wd = float(weight_decay)
    if key == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas_t, eps=float(eps), weight_decay=wd)
    if key == "lion":
        return Lion(groups, lr=lr, betas=betas_t, weight_decay=wd)
    bnb = _import_bitsandbytes()
    if key == "lion8bit":
        return bnb.optim.Lion8bit(groups, lr=lr, betas=betas_t, weight_decay=wd)
    return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas_t, eps=float(eps), weight_decay=wd)


def lr_multiplier(
    step: int,
    *,
    name: str,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> float:
    """The factor applied to each group's base lr for the optimizer step after ``step`` steps.

    ``step`` counts optimizer steps already taken (0 for the first).  Warmup is linear,
    ``min(1, (step + 1) / warmup_steps)`` when ``warmup_steps > 0``: the first step already
    has lr/warmup (never 0, so no step is wasted) and step ``warmup_steps − 1`` reaches the
    full lr.  Schedules:

    * ``constant``: 1 (warmup ignored);
    * ``constant_with_warmup``: the warmup, then 1;
    * ``cosine``: the warmup, then ``r + (1 − r)·½(1 + cos(π·progress))`` with
      ``progress = (step − warmup) / max(1, total − warmup)`` clipped to [0, 1], r = ``min_lr_ratio``.
    """
    if name not in SCHEDULES:
        raise ConfigError(f"unknown lr schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
    if warmup_steps < 0 or total_steps < 0:
        raise ConfigError(f"warmup_steps and total_steps must be >= 0, got {warmup_steps}, {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
    step = max(0, int(step))
    if name == "constant":
        return 1.0
    if warmup_steps > 0 and step < warmup_steps:
        return min(1.0, (step + 1) / warmup_steps)
    if name == "constant_with_warmup":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    name: str,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """A ``LambdaLR`` following :func:`lr_multiplier`; call ``step()`` once per optimizer step.

    Not per micro-step, and not through ``accelerator.prepare`` (which would step it once
    per process).  Its ``state_dict`` holds only the step count and base lrs, so resuming
    restores the position while the schedule itself comes from the config.
    """
    lr_multiplier(0, name=name, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio)

    def multiplier(step: int) -> float:
        return lr_multiplier(
            step, name=name, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio
        )

    return LambdaLR(optimizer, multiplier)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (a tensor shared by several params counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            nbytes = value.numel() * value.element_size()
            key = (value.data_ptr(), nbytes)
            if nbytes and key not in seen:
                seen.add(key)
                total += nbytes
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    for state in optimizer.state.values():
        visit(state)
    return total
