"""Indexing webdataset tar shards: memory and time, local ``.tar`` (read in place) vs ``.tar.gz``.

Writes ``--images`` random-noise JPEGs (incompressible, about ``--kib`` KiB each) with a
``.txt`` caption into ``--shards`` uncompressed shards and the same shards gzipped, then
indexes each set the way the trainer does (``open_source`` + ``index_records`` with
``verify=True``, the default ``data.verify_sizes``) in a fresh process and reports the
peak-RSS growth and the wall time of each, plus the size of the shard set.  A local
``.tar`` is read in place, so its growth should stay far below the data size; a ``.tar.gz``
must hold every image's bytes.

    python benchmarks/shard_index_bench.py [--images 800] [--kib 256] [--shards 8] [--dir DIR]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

_INDEX = """
import json, resource, sys, time
from lokr_trainer.data import BucketConfig, BucketSet, index_records, open_source
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
recs = list(open_source(sys.argv[1]))
index = index_records(recs, BucketSet.from_config(BucketConfig(resolution=1024)), verify=True, progress=False)
seconds = time.perf_counter() - t0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"records": len(index), "seconds": seconds, "grown_mib": (after - before) / 1024}))
"""


def write_shards(root: Path, images: int, kib: int, shards: int) -> int:
    """The shard set (plain and gzipped); returns its size in bytes."""
    rng = np.random.default_rng(0)
    side = int((kib * 1024 / 1.2) ** 0.5)  # noise JPEG at quality 95: about 1.2 bytes per pixel
    total = 0
    per = -(-images // shards)
    for s in range(shards):
        path = root / f"{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for k in range(s * per, min(images, (s + 1) * per)):
                w, h = side + 16 * (k % 3), side
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
                for name, data in ((f"{k:07d}.jpg", buf.getvalue()), (f"{k:07d}.txt", f"tag_{k}, noise".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        with open(path, "rb") as src, gzip.open(root / f"{s:06d}.tar.gz", "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst)
        total += path.stat().st_size
    return total


def index_in_a_fresh_process(pattern: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _INDEX, pattern], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--kib", type=int, default=256)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--dir", help="work folder (default: a temporary one, removed afterwards)")
    args = ap.parse_args()
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="shard_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        size = write_shards(root, args.images, args.kib, args.shards)
        last = f"{args.shards - 1:06d}"
        print(f"{args.images} images in {args.shards} shards, {size / 2**20:.0f} MiB of tar")
        for kind in ("tar", "tar.gz"):
            r = index_in_a_fresh_process(str(root / f"{{000000..{last}}}.{kind}"))
            print(f"  .{kind:<7} {r['records']} records indexed in {r['seconds']:.2f} s, "
                  f"peak RSS grew {r['grown_mib']:.0f} MiB ({r['grown_mib'] / (size / 2**20):.2f} x the data)")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
