"""Streaming SDXL merges: weighted sums, CLIP embedding restore, LoKr baking.

``python -m lokr_trainer.merge`` and these functions do the same thing:
validate every input first (headers and LoKr files only), then stream the
output one tensor at a time, fp32 arithmetic, one rounding to the output
dtype, atomic write.  Peak memory is a few tensors plus the LoKr files, never
the model (DESIGN.md §5).

    from lokr_trainer.merge import bake_lokr, weighted_sum, run_recipe
    weighted_sum(["a.safetensors", "b.safetensors"], "ab.safetensors", weights=[0.5, 0.5])
    bake_lokr("ab.safetensors", ["delta.safetensors:1.0"], "final.safetensors")
    run_recipe("recipe.toml")

Light on purpose: no diffusers or transformers import (a diffusers-folder
base is converted key by key through the name tables).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from lokr_trainer.merge.plan import EMBEDDING_KEYS, ComponentCount, LoKrCount, MergePlan, plan_merge
from lokr_trainer.merge.metadata import build_metadata
from lokr_trainer.merge.report import format_report
from lokr_trainer.merge.recipe import LoKrInput, Recipe, load_recipe
from lokr_trainer.merge.run import RunStats, execute

__all__ = [
    "EMBEDDING_KEYS",
    "LoKrInput",
    "MergePlan",
    "MergeResult",
    "Recipe",
    "bake",
    "bake_lokr",
    "load_recipe",
    "merge",
    "plan_merge",
    "restore_embeddings",
    "run_recipe",
    "weighted_sum",
]

logger = logging.getLogger("lokr_trainer.merge")


@dataclass
class MergeResult:
    """What a merge did (or, for a dry run, would do)."""

    recipe: Recipe
    #: the written file; None for a dry run
    out: Path | None
    report: str
    warnings: list[str]
    components: dict[str | None, ComponentCount]
    lokr_counts: list[LoKrCount]
    expected_peak_bytes: int
    metadata: dict[str, str]
    stats: RunStats | None = None
    dry_run: bool = False
    operations: list[str] = field(default_factory=list)


def run_recipe(
    recipe: "Recipe | str | Path",
    *,
    dry_run: bool = False,
    progress: bool = True,
    log_warnings: bool = True,
    **overrides: Any,
) -> MergeResult:
    """Run a :class:`Recipe` (or a recipe TOML file, ``overrides`` replacing its values).

    ``dry_run`` validates everything and returns the plan's report (with the
    expected peak memory) without writing anything.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, **overrides)
    elif overrides:
        recipe = recipe.with_(**{k: v for k, v in overrides.items() if v is not None})
    with plan_merge(recipe) as plan:
        plan.header_metadata = build_metadata(plan)
        peak = plan.expected_peak_bytes()
        report = format_report(plan, peak=peak)
        if log_warnings:
            for w in plan.warnings:
                logger.warning(w)
        stats = None if dry_run else execute(plan, progress=progress)
        return MergeResult(
            recipe=recipe,
            out=None if dry_run else recipe.out,
            report=report,
            warnings=list(plan.warnings),
            components=plan.components,
            lokr_counts=plan.lokr_counts,
            expected_peak_bytes=peak,
            metadata=dict(plan.header_metadata),
            stats=stats,
            dry_run=dry_run,
            operations=plan.operations,
        )


def _lokr_inputs(lokrs: Any, multipliers: Sequence[float] | None) -> tuple[LoKrInput, ...]:
    if isinstance(lokrs, (str, Path, LoKrInput)) or (isinstance(lokrs, tuple) and len(lokrs) == 2 and not isinstance(lokrs[1], (str, Path))):
        lokrs = [lokrs]
    out = []
    for x in lokrs:
        if isinstance(x, tuple):
            out.append(LoKrInput(Path(x[0]), float(x[1])))
        else:
            out.append(LoKrInput.parse(x))
    if multipliers is not None:
        if len(multipliers) != len(out):
            from lokr_trainer.errors import ConfigError

            raise ConfigError(f"{len(multipliers)} multipliers for {len(out)} LoKr files")
        out = [LoKrInput(l.path, float(m)) for l, m in zip(out, multipliers)]
    return tuple(out)


def merge(
    out: "str | Path",
    bases: "str | Path | Iterable[str | Path]",
    *,
    weights: Sequence[float] | None = None,
    restore_embeddings: "str | Path | None" = None,
    lokrs: Any = (),
    multipliers: Sequence[float] | None = None,
    dtype: str = "fp16",
    overwrite: bool = False,
    skip_unmatched: bool = False,
    hash_inputs: bool = False,
    title: str | None = None,
    dry_run: bool = False,
    progress: bool = True,
    metadata: Mapping[str, str] | None = None,
) -> MergeResult:
    """All operations in one pass, in DESIGN.md §5 order: weighted sum → restore → bake.

    ``lokrs``: paths, ``"path:mult"`` strings, ``(path, mult)`` pairs or
    :class:`LoKrInput`; ``multipliers`` overrides theirs.
    """
    base_list = [bases] if isinstance(bases, (str, Path)) else list(bases)
    recipe = Recipe(
        out=Path(out),
        bases=tuple(Path(b) for b in base_list),
        weights=None if weights is None else tuple(weights),
        restore_embeddings=None if restore_embeddings is None else Path(restore_embeddings),
        lokrs=_lokr_inputs(lokrs, multipliers),
        dtype=dtype,
        overwrite=overwrite,
        skip_unmatched=skip_unmatched,
        hash_inputs=hash_inputs,
        title=title,
        extra_metadata=dict(metadata or {}),
    )
    return run_recipe(recipe, dry_run=dry_run, progress=progress)


def weighted_sum(
    bases: "Iterable[str | Path]", out: "str | Path", weights: Sequence[float] | None = None, **kwargs: Any
) -> MergeResult:
    """W = Σ wᵢ·Wᵢ over N SDXL checkpoints (default: the average); integer tensors from the first."""
    return merge(out, list(bases), weights=weights, **kwargs)


def restore_embeddings(base: "str | Path", reference: "str | Path", out: "str | Path", **kwargs: Any) -> MergeResult:
    """``base`` with the CLIP token/position embeddings of ``reference`` (bit-exact)."""
    return merge(out, [base], restore_embeddings=reference, **kwargs)


def bake_lokr(
    base: "str | Path", lokrs: Any, out: "str | Path", *, multipliers: Sequence[float] | None = None, **kwargs: Any
) -> MergeResult:
    """W' = W + Σ mⱼ·ΔWⱼ: bake LoKr files into a full checkpoint (TE2 q/k/v into their rows)."""
    return merge(out, [base], lokrs=lokrs, multipliers=multipliers, **kwargs)


#: DESIGN.md §5 calls it ``bake``.
bake = bake_lokr
