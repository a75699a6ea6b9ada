"""The human summary of a merge plan: inputs, operations, key accounting, memory."""

from __future__ import annotations

from lokr_trainer.merge.plan import ComponentCount, MergePlan, _few
from lokr_trainer.merge.recipe import DTYPE_NAMES
from lokr_trainer.sdxl.layout import EMBEDDING_KEYS, LABELS
from lokr_trainer.units import fmt_bytes


def format_report(plan: MergePlan, *, peak: int | None = None) -> str:
    """The human summary: inputs, operations, key accounting per component, memory."""
    r = plan.recipe
    lines = ["inputs:"]
    for i, src in enumerate(plan.bases):
        w = f"  weight {plan.weights[i]:g}" if plan.weights is not None else ""
        kind = "  (diffusers folder)" if src.path.is_dir() else ""
        lines.append(f"  base {i + 1}: {src.path}  {fmt_bytes(src.size_bytes)}{kind}{w}")
    if plan.reference is not None:
        lines.append(f"  restore embeddings from: {plan.reference.path}  ({len(EMBEDDING_KEYS)} keys)")
    for spec, count in zip(r.lokrs, plan.lokr_counts):
        lines.append(
            f"  lokr: {spec.path}  {fmt_bytes(spec.path.stat().st_size)}  multiplier {spec.multiplier:g}  "
            f"({count.modules} modules)"
        )
    lines.append(
        f"output: {r.out}  {DTYPE_NAMES[r.dtype]}  {len(plan.items)} tensors  {fmt_bytes(plan.output_bytes)}"
        + ("  (overwrite)" if r.out.exists() else "")
    )
    lines.append("operations: " + (" -> ".join(plan.operations) or f"none (copy, cast to {DTYPE_NAMES[r.dtype]})"))
    lines.append("")
    cols = ("summed", "restored", "copied", "baked", "cast", "verbatim")
    lines.append("keys: total = summed + restored + copied; baked, cast and verbatim (bit for bit) are among those")
    lines.append(f"{'':<8}{'total':>7}" + "".join(f"{c:>10}" for c in cols))
    tot = ComponentCount()
    for comp, cc in plan.components.items():
        lines.append(f"{LABELS[comp]:<8}{cc.keys:>7}" + "".join(f"{getattr(cc, c):>10}" for c in cols))
        for f in vars(tot):
            setattr(tot, f, getattr(tot, f) + getattr(cc, f))
    lines.append(f"{'all':<8}{tot.keys:>7}" + "".join(f"{getattr(tot, c):>10}" for c in cols))
    if r.lokrs:
        lines.append("")
        lines.append(f"{'LoKr modules':<40}{'UNet':>7}{'TE1':>7}{'TE2':>7}{'unmatched':>11}")
        for spec, count in zip(r.lokrs, plan.lokr_counts):
            name = spec.path.name if len(spec.path.name) <= 38 else "…" + spec.path.name[-37:]
            um = sum(len(v) for v in count.unmatched.values())
            lines.append(
                f"{name:<40}"
                + "".join(f"{count.applied.get(c, 0):>7}" for c in ("unet", "text_encoder", "text_encoder_2"))
                + f"{um:>11}"
            )
            for comp, names in count.unmatched.items():
                lines.append(f"    unmatched {LABELS.get(comp, comp)}: {_few(names, 4)}")
    if peak is not None:
        lines.append("")
        lines.append(
            f"expected peak memory: {fmt_bytes(peak)} (LoKr tensors {fmt_bytes(sum(c.resident_bytes for c in plan.lokr_counts))}, "
            f"tensors in flight <= {fmt_bytes(plan.pipeline_bytes())}, "
            f"largest tensor job {fmt_bytes(plan.max_item_cost())})"
        )
    for n in plan.notes:
        lines.append(f"note: {n}")
    for w in plan.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)
