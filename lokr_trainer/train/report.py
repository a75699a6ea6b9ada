"""What a run tells its user: the summary before the first step, the closing line, TensorBoard.

Kept apart from the loop so the loop reads as the algorithm it is.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger(__name__)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


def run_summary(
    cfg: Any,
    layout: Any,
    n_images: int,
    n_buckets: int,
    steps_per_epoch: int,
    total_steps: int,
    start_step: int,
    lokr_summary: Any,
    groups: Sequence[dict],
    skipped: str,
    output_dir: Path,
) -> str:
    """The lines printed before the first step: data, global batch, steps, parameters, outputs."""
    tc = cfg.train
    per = {c: lokr_summary.component(c).parameters for c in ("unet", "te1", "te2")}
    lrs = ", ".join(f"{g['name']} {g['lr']:.2e}" for g in groups)
    outputs = "config.toml, lokr.safetensors, state/, logs/" + (", samples/" if cfg.sample.every else "")
    return "\n".join(
        [
            f"lokr_trainer: LoKr on {cfg.model.path} ({cfg.model.dtype} base, mixed precision {tc.mixed_precision})",
            f"  data         {n_images:,} images in {n_buckets} buckets from {', '.join(cfg.data.path)} ({skipped})",
            f"  global batch {layout.global_batch} = batch {layout.batch_size} x accumulation {layout.grad_accum} "
            f"x processes {layout.num_processes}",
            f"  steps        {total_steps} optimizer steps ({total_steps / steps_per_epoch:.2f} epochs of "
            f"{steps_per_epoch} steps)" + (f", resuming at step {start_step}" if start_step else ""),
            f"  trainable    {_count(lokr_summary.parameters)} parameters in {lokr_summary.modules} modules "
            f"(unet {_count(per['unet'])}, te1 {_count(per['te1'])}, te2 {_count(per['te2'])})",
            f"  adapter file {lokr_summary.file_bytes / 1e6:.1f} MB ({tc.save_dtype})",
            f"  optimizer    {cfg.optimizer.name}: {lrs}; {cfg.scheduler.name}, warmup {cfg.scheduler.warmup_steps} steps",
            f"  outputs      {output_dir}/ ({outputs})",
        ]
    )


def end_summary(result: Any, prompts: str) -> str:
    """One closing line: steps, time, loss first → last (mean of a tenth of the run), skips."""
    finite = [x for x in result.losses if math.isfinite(x)]
    k = max(1, len(finite) // 10)
    first = sum(finite[:k]) / k if finite else float("nan")
    last = sum(finite[-k:]) / k if finite else float("nan")
    line = (
        f"trained {result.steps_done} steps in {result.seconds:.1f} s: loss {first:.4f} -> {last:.4f} "
        f"(mean of first/last {k}); {result.skipped_steps} steps skipped, {result.skipped_images} images skipped; {prompts}"
    )
    if result.adapter is not None:
        line += f"\nadapter: {result.adapter}"
    return line


class TrainLog:
    """TensorBoard scalars and images on the main process; does nothing elsewhere or without tensorboard."""

    def __init__(self, log_dir: Path | None) -> None:
        self.writer = None
        if log_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            logger.warning("tensorboard is not installed: no training logs (pip install tensorboard)")
            return
        self.writer = SummaryWriter(str(log_dir))

    def step(self, step: int, *, loss: float, grad_norm: float, lrs: Sequence[float], groups: Sequence[dict],
             images_per_second: float, counters: dict) -> None:
        if self.writer is None:
            return
        w = self.writer
        w.add_scalar("train/loss", loss, step)
        if math.isfinite(grad_norm):
            w.add_scalar("train/grad_norm", grad_norm, step)
        for g, value in zip(groups, lrs):
            w.add_scalar(f"lr/{g.get('name', 'group')}", value, step)
        w.add_scalar("train/images_per_second", images_per_second, step)
        w.add_scalar("train/skipped_steps", counters["skipped_steps"], step)
        w.add_scalar("train/images_seen", counters["images_seen"], step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def images(self, step: int, paths: Sequence[Path]) -> None:
        if self.writer is None:
            return
        import numpy as np
        from PIL import Image

        for i, p in enumerate(paths):
            with Image.open(p) as im:
                self.writer.add_image(f"samples/{i}", np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
