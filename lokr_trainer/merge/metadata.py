"""What the merged file says about itself: ``modelspec.*`` and ``lokr_trainer.merge``.

UIs recognise SDXL by ``modelspec.architecture``; the ``lokr_trainer.merge``
JSON records the recipe (inputs with their sizes, weights, multipliers, dtype,
key counts) so a checkpoint can be traced back to what made it.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from lokr_trainer.merge.plan import MergePlan
from lokr_trainer.sdxl.layout import EMBEDDING_KEYS, LABELS, MODELSPEC_ARCHITECTURE, MODELSPEC_IMPLEMENTATION, MODELSPEC_SPEC_VERSION
from lokr_trainer.merge.recipe import DTYPE_NAMES

#: modelspec keys worth keeping from the first base (they describe the architecture, not the file).
_CARRIED_MODELSPEC = (
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.resolution",
    "modelspec.prediction_type",
    "modelspec.timestep_range",
    "modelspec.encoder_layer",
)


def _input_record(src_path: Path, size: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"name": src_path.name, "bytes": size}
    if src_path.is_dir():
        rec["format"] = "diffusers"
    return rec


def build_metadata(plan: MergePlan, hashes: dict[Path, Any] | None = None) -> dict[str, str]:
    """``modelspec.*`` (so UIs recognise SDXL) and ``lokr_trainer.merge`` (the recipe that made it)."""
    from lokr_trainer import __version__

    recipe = plan.recipe
    first = plan.bases[0]
    meta: dict[str, str] = {
        "modelspec.sai_model_spec": MODELSPEC_SPEC_VERSION,
        "modelspec.architecture": MODELSPEC_ARCHITECTURE,
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.resolution": "1024x1024",
    }
    for k in _CARRIED_MODELSPEC:
        if k in first.metadata:
            meta[k] = first.metadata[k]
    meta["modelspec.title"] = recipe.title or recipe.out.stem
    meta["modelspec.date"] = datetime.date.today().isoformat()

    def rec(path: Path, size: int) -> dict[str, Any]:
        r = _input_record(path, size)
        if hashes is not None and path in hashes:
            r["sha256"] = hashes[path]
        return r

    merge: dict[str, Any] = {"version": __version__, "operations": plan.operations, "dtype": DTYPE_NAMES[recipe.dtype]}
    merge["bases"] = []
    for i, src in enumerate(plan.bases):
        r = rec(src.path, src.size_bytes)
        if plan.weights is not None:
            r["weight"] = plan.weights[i]
        merge["bases"].append(r)
    if plan.reference is not None:
        merge["restore_embeddings"] = {**rec(plan.reference.path, plan.reference.size_bytes), "keys": list(EMBEDDING_KEYS)}
    if recipe.lokrs:
        merge["lokrs"] = []
        for spec, count in zip(recipe.lokrs, plan.lokr_counts):
            r = rec(spec.path, spec.path.stat().st_size)
            r["multiplier"] = spec.multiplier
            r["modules_applied"] = count.modules
            skipped = sum(len(v) for v in count.unmatched.values())
            if skipped:
                r["modules_skipped"] = skipped
            merge["lokrs"].append(r)
        merge["skip_unmatched"] = recipe.skip_unmatched
    merge["keys"] = {
        LABELS[c]: {k: v for k, v in vars(cc).items() if v} for c, cc in plan.components.items()
    }
    meta["lokr_trainer.version"] = __version__
    meta["lokr_trainer.merge"] = json.dumps(merge, sort_keys=True, separators=(",", ":"))
    meta.update({str(k): str(v) for k, v in recipe.extra_metadata.items()})
    return meta


