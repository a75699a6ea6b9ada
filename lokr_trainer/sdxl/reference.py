"""The key list of a real SDXL 1.0 base single file: names, shapes, dtypes.

Facts about the public ``sd_xl_base_1.0.safetensors`` (2515 tensors: UNet 1680,
CLIP-L 197, bigG 390, VAE 248), transcribed from the key/shape listing
published in the sd-mecha project's ``sdxl-sgm`` model config (data, not
code); dtypes are those of the released fp16 file.  Used to check key maps at
full size without the 7 GB file, to tell users which keys their checkpoint
lacks, and to build full-size random checkpoints for benchmarks.
"""

from __future__ import annotations

import gzip
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Mapping

import torch


@cache
def sdxl_base_keys() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every single-file key of SDXL 1.0 base -> (shape, dtype)."""
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    data = resources.files("lokr_trainer.sdxl").joinpath("sdxl_base_1_0_keys.tsv.gz").read_bytes()
    for line in gzip.decompress(data).decode().splitlines():
        key, shape, dtype = line.split("\t")
        out[key] = (tuple(int(x) for x in shape.split(",") if x), getattr(torch, dtype))
    return out


def sdxl_base_shapes() -> dict[str, tuple[int, ...]]:
    """Every single-file key of SDXL 1.0 base -> shape."""
    return {k: v[0] for k, v in sdxl_base_keys().items()}


@cache
def _reference_modules() -> dict[str, frozenset[str]]:
    """Reference module path -> the tensor names it holds (``weight``, ``bias``, ...)."""
    out: dict[str, set[str]] = {}
    for key in sdxl_base_keys():
        mod, _, leaf = key.rpartition(".")
        out.setdefault(mod, set()).add(leaf)
    return {m: frozenset(v) for m, v in out.items()}


def _is_full_size(metas: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> bool:
    ref = sdxl_base_keys()
    return all(k in metas and tuple(metas[k][0]) == ref[k][0] for k in _SIZE_PROBES)


#: Keys whose shapes say "this is SDXL 1.0's size" (UNet width, CLIP-L and bigG widths).
_SIZE_PROBES: tuple[str, ...] = (
    "model.diffusion_model.input_blocks.0.0.weight",
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
    "conditioner.embedders.1.model.token_embedding.weight",
    "first_stage_model.encoder.conv_in.weight",
)


def _same_shape(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    # VAE attention q/k/v/proj_out: [C, C, 1, 1] in SGM files, [C, C] in some converted ones; both load.
    return got == want or (len(want) == 4 and want[2:] == (1, 1) and got == want[:2])


def check_base_tensors(metas: Mapping[str, tuple[tuple[int, ...], torch.dtype]], path: Path | str | None) -> None:
    """Refuse a base whose key set, shapes or dtypes ``load_sdxl`` would refuse, from its header alone.

    The merge writes what it reads without building any network, so it needs
    this check to never produce a file ``load_sdxl`` rejects.  At SDXL 1.0's
    size the key set and every shape must equal the reference (the verbatim
    ``position_ids``/``logit_scale`` may be absent: loaders fill in their
    defaults).  At other sizes (tiny test models, pruned variants) every key
    must be a reference tensor name, every module must hold all of the
    reference's tensors, and a bias must fit its weight.  Every network tensor
    but ``position_ids`` must be floating point.
    """
    from lokr_trainer.errors import CorruptFileError
    from lokr_trainer.sdxl.layout import PASSTHROUGH_KEYS, PREFIXES

    ref = sdxl_base_keys()
    modules = _reference_modules()
    pid = PREFIXES["text_encoder"] + "text_model.embeddings.position_ids"
    net = {k: v for k, v in metas.items() if any(k.startswith(p) for p in PREFIXES.values())}

    def fail(problem: str, hint: str = "the file is damaged, or not an SDXL checkpoint") -> None:
        raise CorruptFileError(path, problem, hint)

    def few(names: list[str]) -> str:
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        return ", ".join(names[:3]) + more

    unknown = sorted(k for k in net if k not in ref)
    if unknown:
        fail(f"{len(unknown)} tensors are not SDXL tensors: {few(unknown)}")
    ints = sorted(k for k, (_, dt) in net.items() if k != pid and not dt.is_floating_point)
    if ints:
        fail(f"{len(ints)} network tensors are not floating point: {few([f'{k} ({metas[k][1]})' for k in ints])}")
    if _is_full_size(metas):
        missing = sorted(k for k in ref if k not in metas and k not in PASSTHROUGH_KEYS)
        if missing:
            fail(f"an SDXL 1.0-size checkpoint lacking {len(missing)} tensors: {few(missing)}")
        wrong = sorted(k for k, (shape, _) in net.items() if not _same_shape(tuple(shape), ref[k][0]))
        if wrong:
            shown = [f"{k} {list(metas[k][0])} (SDXL: {list(ref[k][0])})" for k in wrong]
            fail(f"{len(wrong)} tensors do not have SDXL 1.0's shapes: {few(shown)}")
        return
    present: dict[str, set[str]] = {}
    for k in net:
        mod, _, leaf = k.rpartition(".")
        present.setdefault(mod, set()).add(leaf)
    incomplete = sorted(
        f"{mod}.{leaf}" for mod, leaves in present.items() for leaf in modules[mod] - leaves
        if f"{mod}.{leaf}" not in PASSTHROUGH_KEYS
    )
    if incomplete:
        fail(f"{len(incomplete)} tensors are missing from modules the file has: {few(incomplete)}")
    for mod, leaves in present.items():
        if {"weight", "bias"} <= leaves:
            w, b = metas[mod + ".weight"][0], metas[mod + ".bias"][0]
            if len(b) != 1 or not w or w[0] != b[0]:
                fail(f"{mod}.bias {list(b)} does not fit {mod}.weight {list(w)}")
