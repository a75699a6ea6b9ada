"""The key list of a real SDXL 1.0 base single file (names, shapes, dtypes).

``tests/data/sdxl_base_1_0_keys.tsv.gz`` holds facts about the public
checkpoint ``sd_xl_base_1.0.safetensors`` (2515 tensors), transcribed from the
key/shape listing published in the sd-mecha project's ``sdxl-sgm`` model
config (data, not code); dtypes are those of the released fp16 file.
"""

from __future__ import annotations

import gzip
from functools import cache
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data" / "sdxl_base_1_0_keys.tsv.gz"


@cache
def sdxl_base_keys() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    out = {}
    with gzip.open(DATA, "rt") as f:
        for line in f:
            key, shape, dtype = line.rstrip("\n").split("\t")
            out[key] = (tuple(int(x) for x in shape.split(",") if x), getattr(torch, dtype))
    return out


def sdxl_base_shapes() -> dict[str, tuple[int, ...]]:
    return {k: v[0] for k, v in sdxl_base_keys().items()}
