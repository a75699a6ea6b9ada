"""Indexing cost at start-up: what ``data.verify_sizes`` costs, and what tar shards hold in RAM.

1. **Folder with sidecars** (``--folder-images`` JPEGs of realistic size, each with a
   ``.json`` sidecar stating its size, the usual danbooru-dump layout): indexed the way the
   trainer does (``open_source`` + ``index_records``) with ``verify=False`` (sizes trusted)
   and ``verify=True`` (the default ``data.verify_sizes``: each image header read), each in
   a fresh process, files in the page cache (a cold network disk costs more per header).
2. **Tar shards**: ``--images`` random-noise JPEGs (incompressible, about ``--kib`` KiB each)
   with a ``.txt`` caption in ``--shards`` uncompressed shards and the same shards gzipped,
   indexed with ``verify=True``; reports peak-RSS growth against the data size.  A local
   ``.tar`` is read in place, so its growth should stay far below the data size; a
   ``.tar.gz`` must hold every image's bytes.

    python benchmarks/index_bench.py [--folder-images 3000] [--images 800] [--kib 256] [--shards 8] [--dir DIR]
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
verify = sys.argv[2] == "verify"
index = index_records(recs, BucketSet.from_config(BucketConfig(resolution=1024)), verify=verify, progress=False)
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


def write_folder(root: Path, images: int) -> int:
    """JPEGs of 0.5–3 megapixels with a .json sidecar giving their size; returns the bytes written."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    sizes = [(1024, 1536), (1536, 1024), (832, 1216), (2048, 1448), (768, 768)]
    base = {}
    for w, h in sizes:  # a smooth picture, not noise: JPEG size as in real illustration dumps
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([(x * 255 // w), (y * 255 // h), ((x + y) * 127 // (w + h))], -1).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        base[(w, h)] = buf.getvalue()
    total = 0
    for k in range(images):
        w, h = sizes[int(rng.integers(len(sizes)))]
        data = base[(w, h)]
        (root / f"{k:07d}.jpg").write_bytes(data)
        (root / f"{k:07d}.json").write_text(json.dumps({"width": w, "height": h, "tag_string_general": f"tag_{k}"}))
        total += len(data)
    return total


def index_in_a_fresh_process(pattern: str, verify: bool = True) -> dict:
    out = subprocess.run([sys.executable, "-c", _INDEX, pattern, "verify" if verify else "trust"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder-images", type=int, default=3000)
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--kib", type=int, default=256)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--dir", help="work folder (default: a temporary one, removed afterwards)")
    args = ap.parse_args()
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="shard_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        folder = root / "folder"
        size = write_folder(folder, args.folder_images)
        print(f"folder: {args.folder_images} JPEGs with .json sidecars, {size / 2**20:.0f} MiB")
        runs = {v: index_in_a_fresh_process(str(folder), verify=v) for v in (False, True, False, True)}
        trust, verify = runs[False], runs[True]  # the second of each pair: both with warm page cache
        per = (verify["seconds"] - trust["seconds"]) / args.folder_images * 1e6
        print(f"  verify_sizes = false {trust['seconds']:.2f} s, true {verify['seconds']:.2f} s "
              f"({verify['seconds'] / trust['seconds']:.2f} x; {per:.0f} us more per image)")
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
