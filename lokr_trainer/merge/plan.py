"""Check a recipe against its inputs and decide, per output key, what to compute.

Everything a merge can refuse is refused here, before a byte is written:
missing files, bases whose keys or shapes differ, a weights count that does
not match, reference embeddings that do not fit, LoKr modules the base lacks
or whose factors do not fit the layer, an existing output.  Only headers and
the (small) LoKr tensors are read; ``--dry-run`` stops after this step.

The result, :class:`MergePlan`, lists the output tensors in the first base's
on-disk order (so reads are sequential) with, for each, where its value
comes from and which LoKr deltas land on it, plus the key accounting the CLI
prints.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from lokr_trainer.errors import (
    CheckpointError,
    KeyMapError,
    ShapeMismatchError,
    UnmatchedModuleError,
)
from lokr_trainer.merge.ops import cast_exact
from lokr_trainer.units import fmt_bytes
from lokr_trainer.merge.recipe import DTYPE_NAMES, Recipe
from lokr_trainer.merge.stream import TensorMeta, TensorSource, open_source
from lokr_trainer.safetensors_io import element_size, read_header
from lokr_trainer.sdxl.keys import Layouts, component_of
from lokr_trainer.sdxl.reference import check_base_tensors
from lokr_trainer.sdxl.layout import EMBEDDING_KEYS, LABELS, PASSTHROUGH_KEYS, PREFIXES, check_is_sdxl

logger = logging.getLogger("lokr_trainer.merge")

#: Components in report order, with the labels users know.

#: Bytes of tensors the pipeline may hold at once (inputs + outputs + deltas), see stream.ordered_map.
DEFAULT_INFLIGHT_BYTES = 192 << 20


# --------------------------------------------------------------------------- plan records


@dataclass
class Contribution:
    """One LoKr module's ``m·ΔW`` on one output tensor."""

    lokr: int  # index into recipe.lokrs
    module: Any  # lokr_trainer.lokr.io.LoKrModuleWeights
    multiplier: float
    shape: tuple[int, ...]  # the weight (or q/k/v row slice) shape ΔW takes
    offset: int = 0  # flat element offset of that slice in the output
    qkv: int | None = None

    @property
    def dora(self) -> bool:
        return "dora_scale" in self.module.tensors

    @property
    def nbytes(self) -> int:
        return 4 * math.prod(self.shape)


@dataclass
class PlanItem:
    """One output tensor: its value is ``source`` (summed if ``weighted``) plus ``deltas``."""

    key: str
    component: str | None
    out: TensorMeta
    source: str  # "bases" (all bases, weighted) | "base" (first base) | "reference"
    weighted: bool = False
    deltas: list[Contribution] = field(default_factory=list)
    in_dtypes: tuple[torch.dtype, ...] = ()

    @property
    def verbatim(self) -> bool:
        """Written byte for byte as read (nothing to compute, no cast)."""
        return not self.weighted and not self.deltas and self.in_dtypes == (self.out.dtype,)

    def cost(self) -> int:
        """Bytes held while this item is in the pipeline."""
        n = self.out.numel
        read = sum(n * element_size(d) for d in self.in_dtypes)
        if self.verbatim:
            return read
        return read + self.out.nbytes + sum(c.nbytes for c in self.deltas) + (8 << 20)


@dataclass
class ComponentCount:
    """Key accounting of one component: every key comes from exactly one of summed / restored / copied.

    ``baked`` (a LoKr delta added), ``cast`` (a dtype change only) and
    ``verbatim`` (written bit for bit) are counted within those three.
    """

    keys: int = 0
    summed: int = 0
    restored: int = 0
    copied: int = 0
    baked: int = 0
    cast: int = 0
    verbatim: int = 0


@dataclass
class LoKrCount:
    applied: dict[str, int] = field(default_factory=dict)  # single-file component -> modules
    unmatched: dict[str, list[str]] = field(default_factory=dict)  # component (or "other") -> names + reason
    modules: int = 0
    resident_bytes: int = 0


@dataclass
class MergePlan:
    recipe: Recipe
    bases: list[TensorSource]
    reference: TensorSource | None
    lokr_files: list[Any]
    items: list[PlanItem]
    weights: tuple[float, ...] | None
    components: dict[str | None, ComponentCount]
    lokr_counts: list[LoKrCount]
    warnings: list[str]
    notes: list[str]
    output_bytes: int
    header_metadata: dict[str, str]
    inflight_bytes: int = DEFAULT_INFLIGHT_BYTES
    workers: int = 2

    def close(self) -> None:
        for s in self.bases:
            s.close()
        if self.reference is not None:
            self.reference.close()

    def __enter__(self) -> "MergePlan":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def operations(self) -> list[str]:
        ops = []
        if self.weights is not None:
            ops.append("weighted_sum")
        if self.reference is not None:
            ops.append("restore_embeddings")
        if self.recipe.lokrs:
            ops.append("bake_lokr")
        return ops

    def max_item_cost(self) -> int:
        return max((it.cost() for it in self.items), default=0)

    def expected_peak_bytes(self, baseline: int | None = None) -> int:
        """Process RSS now (interpreter, torch, LoKr tensors) + tensors in flight + the one being written."""
        if baseline is None:
            baseline = current_rss()
        biggest = self.max_item_cost()
        return baseline + self.pipeline_bytes() + biggest

    def pipeline_bytes(self) -> int:
        """The most the worker pipeline holds at once (see stream.ordered_map)."""
        total = sum(it.cost() for it in self.items)
        return min(max(self.inflight_bytes, self.max_item_cost()), total)


# --------------------------------------------------------------------------- helpers


def current_rss() -> int:
    """Resident memory of this process now (bytes); the peak so far where 'now' is unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _few(names: Iterable[str], n: int = 5) -> str:
    names = list(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _check_sdxl(src: TensorSource) -> None:
    check_is_sdxl(src.keys(), src.path)  # the same rule (and messages) as load_sdxl
    # key set, shapes and dtypes against the SDXL reference, so a single base is checked as strictly as several
    check_base_tensors({k: (src.meta(k).shape, src.meta(k).dtype) for k in src.keys()}, src.path)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _input_clash(out: Path, inputs: Sequence[Path]) -> Path | None:
    """The input that writing ``out`` would change, if any.

    A file input clashes when ``out`` is the same file (any path, symlink or
    hard link); a folder input (diffusers) when ``out`` lies inside it once
    symlinks are resolved, or is a hard link of a file in it.
    """
    resolved = out.resolve()
    for p in inputs:
        if p.is_dir():
            root = p.resolve()
            if resolved == root or root in resolved.parents:
                return p
            if out.exists() and any(_same_file(f, out) for f in root.rglob("*") if f.is_file()):
                return p
        elif _same_file(p, out):
            return p
    return None


# --------------------------------------------------------------------------- LoKr matching


def _module_table(src: TensorSource) -> tuple[Any, Any]:
    """The LoKr module table and UNet layout of the base, from its key shapes (no network built)."""
    from lokr_trainer.lokr.names import ModuleTable
    from lokr_trainer.sdxl import configs

    shapes = {k: src.meta(k).shape for k in src.keys()}
    try:
        layouts = Layouts.from_file_keys(shapes)
        table = ModuleTable.from_configs(
            configs.infer_unet_config(shapes),
            configs.infer_text_encoder_config(shapes)["num_hidden_layers"],
            configs.infer_text_encoder_2_config(shapes)["num_hidden_layers"],
        )
    except KeyMapError as e:
        raise CheckpointError(src.path, f"cannot list the LoKr-able modules of this base: {e}") from None
    return table, layouts.unet


def _match_lokrs(recipe: Recipe, base: TensorSource, warnings: list[str]) -> tuple[list[Any], list[LoKrCount], dict[str, list[Contribution]]]:
    """Load every LoKr file and map its modules onto base keys; refuse what does not fit."""
    from lokr_trainer.lokr.io import describe_non_lokr, group_module_tensors, load_lokr
    from lokr_trainer.lokr.names import MODEL_ATTR, adapter_component_of, lokr_name_to_sdxl_key, normalize_lokr_name

    table, layout = _module_table(base)
    files: list[Any] = []
    counts: list[LoKrCount] = []
    by_key: dict[str, list[Contribution]] = {}
    for li, spec in enumerate(recipe.lokrs):
        path = spec.path
        if path.is_dir() or not path.exists():
            raise CheckpointError(path, "LoKr file not found")
        header = read_header(path)
        what = describe_non_lokr(header.tensors)
        if what is not None:
            raise CheckpointError(path, f"this file is {what}")
        count = LoKrCount()
        # 1. Names first (headers only): which modules does this base have?
        for raw, names in group_module_tensors(header.tensors).items():
            tensors = set(names)
            group = adapter_component_of(raw)
            comp = MODEL_ATTR[group] if group is not None else None
            if not tensors & {"lokr_w1", "lokr_w1_a"}:
                count.unmatched.setdefault(comp or "other", []).append(f"{raw} (not a LoKr module: {', '.join(sorted(tensors))})")
                continue
            try:
                normalize_lokr_name(raw, layout, table)
            except KeyMapError as e:
                count.unmatched.setdefault(comp or "other", []).append(f"{raw} ({e})")
        n_unmatched = sum(len(v) for v in count.unmatched.values())
        n_named = len(group_module_tensors(header.tensors))

        def per_component() -> str:
            return "; ".join(f"{LABELS.get(c, c)}: {_few(v, 3)}" for c, v in count.unmatched.items())

        def unmatched_error(n: int) -> UnmatchedModuleError:
            return UnmatchedModuleError(
                f"{path}: {n} LoKr modules have no layer in base {base.path}: {per_component()} "
                "(is the adapter for another model? --skip-unmatched skips them with a warning)"
            )

        if n_unmatched == n_named:
            raise unmatched_error(n_unmatched)
        # 2. Tensors (small) through the LoKr reader; names it cannot place were listed above.
        lf = load_lokr(path, layout=layout, table=table, skip_unknown=True, warn_skipped=False)
        files.append(lf)
        base_ver = lf.metadata.get("ss_base_model_version", "")
        if base_ver and not base_ver.startswith("sdxl"):
            warnings.append(f"{path.name}: metadata says ss_base_model_version={base_ver!r}, not SDXL")
        # 3. Shapes of every placed module, all checked before anything is refused, so an adapter
        #    for another model size says so in one run (not "unmatched" first, "misfit" after a rerun).
        seen: dict[tuple[str, int | None], str] = {}
        misfits: list[str] = []
        for name, module in lf.modules.items():
            key, qkv = lokr_name_to_sdxl_key(name, layout, table)
            comp = component_of(key)
            try:
                meta = base.meta(key)
            except KeyError:
                count.unmatched.setdefault(comp or "other", []).append(f"{module.label} (no tensor {key} in the base)")
                continue
            if (key, qkv) in seen:
                raise CheckpointError(path, f"modules {seen[(key, qkv)]} and {module.label} both modify {key}")
            seen[(key, qkv)] = module.label
            shape = meta.shape
            offset = 0
            if qkv is not None:
                if len(shape) != 2 or shape[0] % 3:
                    raise ShapeMismatchError(f"{path}: module {module.label}: {key} {list(shape)} is not a stacked q/k/v weight")
                rows = shape[0] // 3
                offset = qkv * rows * shape[1]
                shape = (rows, shape[1])
            if not meta.dtype.is_floating_point or not module.fits(shape):
                got = module.kron_shape()
                misfits.append(
                    f"{module.label} gives a {got[0]}x{got[1]} delta (rows x columns·kernel) for "
                    f"{key}{' q/k/v part ' + str(qkv) if qkv is not None else ''} {list(shape)} {meta.dtype}"
                )
                continue
            c = Contribution(li, module, spec.multiplier, tuple(shape), offset, qkv)
            by_key.setdefault(key, []).append(c)
            count.applied[comp] = count.applied.get(comp, 0) + 1
            count.modules += 1
        n_unmatched = sum(len(v) for v in count.unmatched.values())
        if misfits:
            lacking = f"; {n_unmatched} more have no layer in it" if n_unmatched else ""
            raise ShapeMismatchError(
                f"{path}: this LoKr is for another model size: {len(misfits)} of its {n_named} modules do not fit "
                f"base {base.path}{lacking} (first: {misfits[0]})"
            )
        if n_unmatched:
            if not recipe.skip_unmatched:
                raise unmatched_error(n_unmatched)
            warnings.append(f"{path.name}: skipping {n_unmatched} modules the base lacks: {per_component()}")
        count.resident_bytes = sum(
            t.numel() * t.element_size() for m in lf.modules.values() for t in m.tensors.values()
        )
        counts.append(count)
    for key, cs in by_key.items():  # q/k/v slices of one key: keep file order, then q, k, v
        cs.sort(key=lambda c: (c.lokr, c.offset))
    return files, counts, by_key


# --------------------------------------------------------------------------- the plan


def plan_merge(recipe: Recipe, *, inflight_bytes: int = DEFAULT_INFLIGHT_BYTES) -> MergePlan:
    """Validate ``recipe`` against its inputs (headers and LoKr files only) and plan the output."""
    warnings: list[str] = []
    notes: list[str] = []
    out = recipe.out
    inputs = [*recipe.bases, *([recipe.restore_embeddings] if recipe.restore_embeddings else []), *(l.path for l in recipe.lokrs)]
    clash = _input_clash(out, inputs)  # first: --overwrite never makes writing over an input right
    if clash is not None:
        raise CheckpointError(out, f"is also an input ({clash}); write the merge to a new file")
    if out.is_dir():
        raise CheckpointError(out, "is a folder; --out must be a .safetensors file path")
    if out.exists() and not recipe.overwrite:
        raise CheckpointError(out, "output exists", "pass --overwrite (overwrite=True) to replace it")
    if out.suffix.lower() != ".safetensors":
        warnings.append(f"{out.name}: output is a safetensors file but its name does not end in .safetensors")

    bases: list[TensorSource] = []
    reference: TensorSource | None = None
    try:
        for p in recipe.bases:
            bases.append(open_source(p))
        first = bases[0]
        _check_sdxl(first)
        keys = first.keys()
        keyset = set(keys)
        for src in bases[1:]:
            other = set(src.keys())
            missing, extra = sorted(keyset - other), sorted(other - keyset)
            if missing or extra:
                parts = []
                if missing:
                    parts.append(f"lacks {len(missing)} keys of {first.path.name} (e.g. {_few(missing, 3)})")
                if extra:
                    parts.append(f"has {len(extra)} keys {first.path.name} lacks (e.g. {_few(extra, 3)})")
                raise CheckpointError(src.path, "; ".join(parts), "bases of a weighted sum must have the same keys")
            for k in keys:
                a, b = first.meta(k), src.meta(k)
                if a.shape != b.shape:
                    raise ShapeMismatchError(
                        f"{src.path}: {k} has shape {list(b.shape)}, but {list(a.shape)} in {first.path} "
                        "(bases of a weighted sum must be the same architecture)"
                    )
                if a.dtype.is_floating_point != b.dtype.is_floating_point:
                    raise CheckpointError(
                        src.path, f"{k} is {b.dtype} here but {a.dtype} in {first.path}",
                        "integer tensors are copied, floats summed: the bases must agree",
                    )

        weights = recipe.effective_weights
        if weights is not None:
            total = sum(weights)
            if abs(total - 1.0) > 1e-6:
                warnings.append(f"weights sum to {total:g}, not 1: the merged weights are scaled by {total:g}")
            if recipe.weights is None:
                notes.append(f"no --weights given: averaging the {len(bases)} bases ({weights[0]:g} each)")

        if recipe.restore_embeddings is not None:
            reference = open_source(recipe.restore_embeddings)
            for k in EMBEDDING_KEYS:
                if k not in keyset:
                    raise CheckpointError(first.path, f"has no {k} to restore")
                try:
                    r = reference.meta(k)
                except KeyError:
                    raise CheckpointError(reference.path, f"reference has no {k}") from None
                if r.shape != first.meta(k).shape:
                    raise ShapeMismatchError(
                        f"{reference.path}: {k} has shape {list(r.shape)}, the base {first.path} {list(first.meta(k).shape)}"
                    )

        lokr_files: list[Any] = []
        lokr_counts: list[LoKrCount] = []
        by_key: dict[str, list[Contribution]] = {}
        if recipe.lokrs:
            lokr_files, lokr_counts, by_key = _match_lokrs(recipe, first, warnings)

        # ---------------------------------------------------------- per-key decisions
        items: list[PlanItem] = []
        comps: dict[str | None, ComponentCount] = {c: ComponentCount() for c in LABELS}
        restore = set(EMBEDDING_KEYS) if reference is not None else set()
        cast_from: dict[str, int] = {}
        kept: list[str] = []
        for k in keys:
            m = first.meta(k)
            comp = component_of(k)
            cc = comps[comp]
            cc.keys += 1
            deltas = by_key.get(k, [])
            if not m.dtype.is_floating_point or k in PASSTHROUGH_KEYS or comp is None:
                if deltas:  # pragma: no cover - LoKr targets are weights of known components
                    raise CheckpointError(first.path, f"{k} cannot take a LoKr delta")
                item = PlanItem(k, comp, m, "base", in_dtypes=(m.dtype,))
                cc.copied += 1
            elif k in restore:
                r = reference.meta(k)  # type: ignore[union-attr]
                dtype = recipe.dtype if (deltas or cast_exact(r.dtype, recipe.dtype)) else r.dtype
                if dtype != recipe.dtype:
                    kept.append(k)
                item = PlanItem(k, comp, TensorMeta(k, dtype, m.shape), "reference", deltas=deltas, in_dtypes=(r.dtype,))
                cc.restored += 1
            elif weights is not None:
                item = PlanItem(
                    k, comp, TensorMeta(k, recipe.dtype, m.shape), "bases", weighted=True, deltas=deltas,
                    in_dtypes=tuple(s.meta(k).dtype for s in bases),
                )
                cc.summed += 1
            else:
                item = PlanItem(k, comp, TensorMeta(k, recipe.dtype, m.shape), "base", deltas=deltas, in_dtypes=(m.dtype,))
                cc.copied += 1
                if not deltas and m.dtype != recipe.dtype:
                    cc.cast += 1
                    name = str(m.dtype).replace("torch.", "")
                    cast_from[name] = cast_from.get(name, 0) + 1
            if deltas:
                cc.baked += 1
            if item.verbatim:
                cc.verbatim += 1
            items.append(item)
        if kept:
            notes.append(
                f"{len(kept)} restored embeddings keep the reference's {reference.meta(kept[0]).dtype} "  # type: ignore[union-attr]
                f"(a cast to {DTYPE_NAMES[recipe.dtype]} would change their bits): {_few(kept, 4)}"
            )
        if cast_from:
            notes.append(
                f"{sum(cast_from.values())} untouched tensors are cast to {DTYPE_NAMES[recipe.dtype]} "
                f"(from {', '.join(f'{v} {k}' for k, v in cast_from.items())}); pass --dtype to keep another"
            )
        pid = PREFIXES["text_encoder"] + "text_model.embeddings.position_ids"
        if pid in keyset and first.meta(pid).dtype.is_floating_point:
            warnings.append(
                f"{first.path.name}: {pid} is stored as {first.meta(pid).dtype} (a known merger bug that makes CLIP "
                "ignore tokens); copied as it is"
            )
        if not comps[None].keys:
            del comps[None]
        output_bytes = sum(it.out.nbytes for it in items)
        plan = MergePlan(
            recipe=recipe,
            bases=bases,
            reference=reference,
            lokr_files=lokr_files,
            items=items,
            weights=weights,
            components=comps,
            lokr_counts=lokr_counts,
            warnings=warnings,
            notes=notes,
            output_bytes=output_bytes,
            header_metadata={},
            inflight_bytes=inflight_bytes,
            workers=2 if recipe.workers is None else recipe.workers,
        )
        _check_free_space(plan)
        return plan
    except BaseException:
        for s in bases:
            s.close()
        if reference is not None:
            reference.close()
        raise


def _check_free_space(plan: MergePlan) -> None:
    folder = plan.recipe.out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # pragma: no cover
        return
    need = plan.output_bytes + (1 << 20)
    if free < need:
        raise CheckpointError(
            plan.recipe.out, f"needs {fmt_bytes(need)} but only {fmt_bytes(free)} is free in {folder}",
            "free some space or write elsewhere",
        )
