"""Peak memory and time of loading a full-size SDXL single file.

    python benchmarks/load_bench.py [--keep] [--dtype fp16|fp32]

Writes a random full-size fp16 SDXL (~6.9 GB, every real key) to a temp
folder, then loads it in a fresh process with ``load_sdxl`` and reports wall
time and peak RSS (``ru_maxrss``).  The target: peak RSS close to the size of
the loaded weights (1x), never 2x.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
from lokr_trainer.sdxl import load_sdxl
dtype = {"fp16": torch.float16, "fp32": torch.float32}[sys.argv[2]]
t = time.perf_counter()
m = load_sdxl(sys.argv[1], dtype=dtype)
wall = time.perf_counter() - t
n = sum(p.numel() * p.element_size() for c in m.components().values() for p in c.parameters())
print(json.dumps({"wall_s": wall, "weights_bytes": n, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the 7 GB file (default: temp)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    from lokr_trainer.testing import write_random_sdxl

    folder = Path(args.dir or tempfile.mkdtemp(prefix="lokr_load_bench_"))
    path = folder / "random_sdxl_fp16.safetensors"
    if not path.exists():
        t = time.perf_counter()
        write_random_sdxl(path)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.1f} s")
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), args.dtype], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"load_sdxl(dtype={args.dtype}): {r['wall_s']:.1f} s, weights {r['weights_bytes'] / 1e9:.2f} GB, "
        f"peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB ({r['peak_rss_bytes'] / r['weights_bytes']:.2f}x the weights)"
    )
    if not args.keep:
        path.unlink()
        if args.dir is None:
            folder.rmdir()


if __name__ == "__main__":
    main()
