"""Decode + resize + crop throughput of the data pipeline at 1024² (images/s).

Generates a few dozen illustration-like images of realistic size (about 2–8
megapixels, as in danbooru dumps) as JPEG, PNG and WebP in a temporary folder,
then runs the real pipeline (``BucketDataset``: decode, EXIF, colour
conversion, bucket at 1024², resize-to-cover, centre crop, to tensor, caption)
in one-bucket batches of 4 through a torch ``DataLoader`` with 0 (in-process),
1 and 2 worker processes.

    python benchmarks/data_bench.py [--images 36] [--passes 3] [--workers 0 1 2]

Wall-clock images/s depends on what else runs on the machine; CPU ms per image (all
processes, including worker start-up) depends much less, so ``cores / (CPU ms / 1000)``
approximates the rate on idle cores.  Training needs ~1.25–10 images/s per GPU for SDXL at
1024² (without a latent cache), so this says how many loader workers a run needs.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lokr_trainer.data.buckets import BucketConfig, BucketSet
from lokr_trainer.data.dataset import BucketDataset, ImageConfig, collate, index_records
from lokr_trainer.data.images import DecodeOptions
from lokr_trainer.data.sampler import BucketBatchSampler
from lokr_trainer.data.sources import FolderSource

SIZES = [(2048, 1536), (1536, 2048), (1200, 1800), (2480, 3508), (1920, 1080), (2000, 2000)]
FORMATS = [("jpg", dict(quality=92)), ("png", dict(compress_level=6)), ("webp", dict(quality=90))]


def illustration(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """Flat colour regions, soft shading and line art: compresses like an illustration, not like noise."""
    cells = rng.integers(0, 256, (h // 128 + 2, w // 128 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(cells).resize((w, h), Image.Resampling.NEAREST), dtype=np.float32)
    x = np.arange(w, dtype=np.float32)
    y = np.arange(h, dtype=np.float32)[:, None]
    shade = 0.75 + 0.25 * (np.sin(x / 97.0) * np.cos(y / 131.0))[..., None]
    img = base * shade + rng.normal(0, 3.0, (h, w, 1)).astype(np.float32)
    lines = (np.abs(np.sin(x / 41.0) * np.cos(y / 53.0)) < 0.02)[..., None]
    img = np.where(lines, np.float32(20.0), img)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        ext, kw = FORMATS[(i // len(SIZES)) % len(FORMATS)] if n >= 18 else FORMATS[i % len(FORMATS)]
        illustration(w, h, rng).save(folder / f"{i:03d}.{ext}", **kw)
        (folder / f"{i:03d}.txt").write_text("1girl, solo, long_hair, smile, looking_at_viewer, outdoors")


def _cpu_seconds() -> float:
    """CPU time of this process plus finished children (DataLoader workers are reaped per pass)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run(ds: BucketDataset, workers: int, passes: int, subset: list[int] | None = None) -> tuple[float, float]:
    """(images/s wall clock, CPU milliseconds per image over all processes) for batches of 4.

    Uses the training path: one-bucket batches from ``BucketBatchSampler``, collated in the workers.
    """
    ids = ds.index.bucket_ids
    sampler = BucketBatchSampler(ids, batch_size=4, seed=0, shuffle=False)
    batches = [b for b in sampler if subset is None or b[0][1] in subset]
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=batches, collate_fn=collate, num_workers=workers, prefetch_factor=4 if workers else None
    )
    n = 0
    for _ in loader:  # warm-up pass: page cache, worker start-up, imports
        pass
    c0, t0 = _cpu_seconds(), time.perf_counter()
    for _ in range(passes):
        for batch in loader:
            assert batch["pixel_values"] is not None
            n += batch["size"]
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    return n / wall, 1000.0 * cpu / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=36)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        make_images(folder, args.images)
        total_mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
        print(f"generated {args.images} images ({total_mb:.0f} MB on disk) in {time.perf_counter() - t0:.1f}s; "
              f"cpus: {os.cpu_count()}")  # fmt: skip
        bs = BucketSet.from_config(BucketConfig(resolution=1024, step=64, min_side=256, max_side=4096))
        index = index_records(FolderSource(folder), bs, progress=False)
        print(f"load average before the run: {os.getloadavg()[0]:.2f} (other processes share these cores)")
        print(f"{'setting':<34}{'images/s':>10}{'CPU ms/img':>12}")

        def show(label: str, ds: BucketDataset, w: int) -> None:
            rate, cpu_ms = run(ds, w, args.passes)
            print(f"{label:<34}{rate:>10.2f}{cpu_ms:>12.1f}", flush=True)

        for draft in (True, False):
            ds = BucketDataset(index, image=ImageConfig(decode=DecodeOptions(jpeg_draft=draft)), seed=0)
            for w in args.workers:
                show(f"workers={w}" + ("" if draft else ", no JPEG draft"), ds, w)
            if not draft:
                break
        ds = BucketDataset(index, seed=0)
        for ext in ("jpg", "png", "webp"):
            sub = {i for i, r in enumerate(index.records) if r.key.endswith(ext)}
            rate, cpu_ms = run(ds, 0, args.passes, sub)
            print(f"{'workers=0, only ' + ext:<34}{rate:>10.2f}{cpu_ms:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
