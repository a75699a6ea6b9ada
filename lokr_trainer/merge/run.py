"""Carry out a :class:`~lokr_trainer.merge.plan.MergePlan`: one streamed pass, one atomic write.

Worker threads read the inputs of the next few output tensors and do the
fp32 arithmetic while the calling thread writes finished tensors, in order,
into a temporary file beside the output (``stream.write_stream``: direct
I/O where possible, fsync, then rename).  Any error, including a full disk or Ctrl-C, removes the
temporary file, so OUT is either complete or untouched.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lokr_trainer.errors import NonFiniteResultError
from lokr_trainer.merge.ops import Delta, NonFiniteResult, _count_non_finite, combine
from lokr_trainer.merge.metadata import build_metadata
from lokr_trainer.merge.plan import MergePlan, PlanItem
from lokr_trainer.merge.report import fmt_bytes
from lokr_trainer.merge.stream import file_sha256, ordered_map, write_stream
from lokr_trainer.safetensors_io import PlannedTensor

logger = logging.getLogger("lokr_trainer.merge")


@dataclass
class RunStats:
    seconds: float = 0.0
    bytes_written: int = 0
    tensors: int = 0
    hashes: dict[str, Any] = field(default_factory=dict)


def _describe(plan: MergePlan, item: PlanItem) -> str:
    parts = []
    if item.weighted:
        parts.append("weighted sum of " + ", ".join(f"{w:g}x{s.path.name}" for w, s in zip(plan.weights or (), plan.bases)))
    elif item.source == "reference":
        parts.append(f"restored from {plan.reference.path.name}")  # type: ignore[union-attr]
    for c in item.deltas:
        parts.append(f"{c.multiplier:g}x LoKr {plan.recipe.lokrs[c.lokr].path.name}:{c.module.name}")
    return " + ".join(parts) or f"cast of {plan.bases[0].path.name}"


def compute_item(plan: MergePlan, item: PlanItem) -> tuple[str, torch.Tensor]:
    """The output tensor of one plan item (runs on a worker thread)."""
    key = item.key
    if item.source == "bases":
        inputs = [s.read(key) for s in plan.bases]
    elif item.source == "reference":
        inputs = [plan.reference.read(key)]  # type: ignore[union-attr]
    else:
        inputs = [plan.bases[0].read(key)]
    if item.verbatim:
        t = inputs[0]
        if t.is_floating_point():  # copied byte for byte, but never a NaN/inf passed on unnoticed
            bad, first = _count_non_finite(t.reshape(-1), 0, 0, -1)
            if bad:
                raise NonFiniteResultError(
                    f"{plan.recipe.out}: not written: {key} holds {bad} inf/nan values already in its input "
                    f"(first at flat index {first}; {_describe(plan, item)}); the input checkpoint is damaged"
                )
        return key, t
    weights = plan.weights if item.weighted else None
    check = item.source != "reference" or bool(item.deltas)
    try:
        if any(c.dora for c in item.deltas):
            out = _combine_with_dora(inputs, weights, item)
            out = combine([out], None, [], item.out.dtype, check_finite=check)
        else:
            deltas = [Delta(c.module.delta_weight(c.shape), c.multiplier, c.offset) for c in item.deltas]
            out = combine(inputs, weights, deltas, item.out.dtype, check_finite=check)
        for c in item.deltas:  # each module lands on one tensor: its factors are no longer needed
            c.module.tensors.clear()
    except NonFiniteResult as e:
        if any(x.is_floating_point() and not bool(torch.isfinite(x).all()) for x in inputs):
            raise NonFiniteResultError(
                f"{plan.recipe.out}: not written: {key} holds inf/nan values already in its input "
                f"({_describe(plan, item)}); the input checkpoint is damaged"
            ) from None
        hint = "lower the multiplier or weights"
        if item.out.dtype == torch.float16:
            hint += ", or use --dtype bf16/fp32 if the values exceed the fp16 range"
        raise NonFiniteResultError(
            f"{plan.recipe.out}: not written: {key} would hold {e.count} inf/nan values "
            f"(first at flat index {e.first_index}) in {item.out.dtype} after {_describe(plan, item)} ({hint})"
        ) from None
    return key, out


def _combine_with_dora(inputs: list[torch.Tensor], weights, item: PlanItem) -> torch.Tensor:
    """Whole-tensor fp32 path for DoRA modules, whose rescale needs ‖W + ΔW‖ of whole rows."""
    acc = combine(inputs, weights, [], torch.float32, check_finite=False)
    flat = acc.reshape(-1)
    for c in item.deltas:
        view = flat[c.offset : c.offset + math.prod(c.shape)].view(c.shape)
        if c.dora:
            view.copy_(c.module.apply_to_weight(view, c.multiplier))
        else:
            d = c.module.delta_weight(c.shape)
            view.add_(d if c.multiplier == 1.0 else d * c.multiplier)
    return acc


def hash_inputs(plan: MergePlan, progress: bool = True) -> dict[Path, Any]:
    """sha256 of every input file (two at a time), for the output metadata."""
    jobs: list[tuple[Path, Path, str]] = []  # (input, file, name inside a folder or "")
    for src in [*plan.bases, *([plan.reference] if plan.reference is not None else [])]:
        for f in src.files():
            jobs.append((src.path, f, str(f.relative_to(src.path)) if src.path.is_dir() else ""))
    for spec in plan.recipe.lokrs:
        jobs.append((spec.path, spec.path, ""))
    unique = list(dict.fromkeys(jobs))
    total = sum(f.stat().st_size for _, f, _ in unique)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="sha256", disable=not progress, dynamic_ncols=True)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            digests = list(pool.map(lambda j: file_sha256([j[1]], bar.update), unique))
    finally:
        bar.close()
    out: dict[Path, Any] = {}
    for (inp, _, inner), digest in zip(unique, digests):
        if inner:
            out.setdefault(inp, {})[inner] = digest
        else:
            out[inp] = digest
    return out


def execute(plan: MergePlan, *, progress: bool = True, torch_threads: int | None = 1) -> RunStats:
    """Write the merge of ``plan`` to ``plan.recipe.out``.

    ``torch_threads``: intra-op threads for the duration of the run.  One per
    worker is fastest here (the workers already use the cores, and the slices
    are too small to split); None leaves torch's setting alone.
    """
    t0 = time.perf_counter()
    recipe = plan.recipe
    stats = RunStats()
    if recipe.hash_inputs:
        hashes = hash_inputs(plan, progress)
        stats.hashes = {str(k): v for k, v in hashes.items()}
        plan.header_metadata = build_metadata(plan, hashes)
    layout = [PlannedTensor(it.key, it.out.dtype, it.out.shape) for it in plan.items]
    n = len(layout)
    bar = tqdm(
        total=plan.output_bytes, unit="B", unit_scale=True, unit_divisor=1024,
        desc=f"merging {recipe.out.name}", disable=not progress, dynamic_ncols=True,
    )

    def written(nbytes: int) -> None:
        stats.tensors += 1
        stats.bytes_written += nbytes
        bar.update(nbytes)
        bar.set_postfix_str(f"{stats.tensors}/{n} tensors", refresh=False)

    old_threads = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    results = ordered_map(
        lambda it: compute_item(plan, it),
        plan.items,
        cost=PlanItem.cost,
        workers=plan.workers,
        max_inflight_bytes=plan.inflight_bytes,
    )
    try:
        write_stream(recipe.out, layout, results, plan.header_metadata, overwrite=recipe.overwrite, progress=written)
    finally:
        results.close()  # stop the workers before anything else happens (error or not)
        bar.close()
        if torch_threads is not None:
            torch.set_num_threads(old_threads)
    stats.seconds = time.perf_counter() - t0
    logger.info("wrote %s (%s, %d tensors) in %.1f s", recipe.out, fmt_bytes(stats.bytes_written), stats.tensors, stats.seconds)
    return stats
