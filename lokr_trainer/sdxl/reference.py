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
