"""Full-size random SDXL single files for benchmarks (7 GB of noise with real key names)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from lokr_trainer.safetensors_io import PlannedTensor, write_safetensors
from lokr_trainer.sdxl.keys import PASSTHROUGH_KEYS
from lokr_trainer.sdxl.reference import sdxl_base_keys


def write_random_sdxl(
    path: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float16, progress: bool = True
) -> Path:
    """Stream a random checkpoint with every key, shape and dtype of SDXL 1.0 base.

    One tensor is in RAM at a time, so this runs on small machines.  Values are
    N(0, 0.02²) (norm scales near 1), enough for timing and memory benchmarks,
    not for images.
    """
    keys = sdxl_base_keys()
    names = sorted(keys)
    plan = [
        PlannedTensor(k, keys[k][1] if (keys[k][1] == torch.int64 or k in PASSTHROUGH_KEYS) else dtype, keys[k][0])
        for k in names
    ]
    total = sum(math.prod(p.shape) * torch.empty((), dtype=p.dtype).element_size() for p in plan)
    g = torch.Generator().manual_seed(seed)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for p in plan:
            if p.dtype == torch.int64:
                yield p.name, torch.arange(math.prod(p.shape), dtype=torch.int64).reshape(p.shape)
            elif p.name.endswith("logit_scale"):
                yield p.name, torch.tensor(math.log(100.0), dtype=p.dtype)
            else:
                t = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=g)
                if p.name.endswith("weight") and len(p.shape) == 1:
                    t += 1.0
                yield p.name, t.to(p.dtype)

    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {Path(path).name}", disable=not progress)
    try:
        return write_safetensors(path, plan, tensors(), {"modelspec.title": "random SDXL (benchmark)"}, progress=bar.update)
    finally:
        bar.close()
