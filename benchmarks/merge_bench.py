"""Bake a full-size LoKr into a full-size fp16 SDXL: wall time against ``cp``, and peak RSS.

    python benchmarks/merge_bench.py [--dir DIR] [--runs 2] [--keep] [--workers 2]

Builds, in DIR (default: a temp folder), a random fp16 SDXL single file with
every key, shape and dtype of SDXL 1.0 base (~6.9 GB, written streaming) and
a random full-matrix LoKr with the ``kohaku-xl-delta`` preset's module list
and factors (~735 MB fp16).  Then, per run:

* ``cp base copy && sync``, wall time (the copy is deleted afterwards, so
  page cache holds the same files for both timings);
* ``/usr/bin/time -v python -m lokr_trainer.merge --base base --lokr lokr
  --out out --dtype fp16`` followed by ``sync``, wall time, and the peak RSS
  ``time -v`` reports ("Maximum resident set size");

and prints the ratio bake/cp (target DESIGN.md §9: <= 2x, stretch 1.5x) and
peak RSS (target < 1.5 GB), with the load average, since other jobs on the
machine skew both.  A few output tensors are checked against the formula
so a fast but wrong bake cannot pass.  Everything written is deleted at the
end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_lokr_like_kohaku(path: Path, seed: int = 0) -> dict[str, int]:
    """Random full-matrix LoKr with the shapes the ``kohaku-xl-delta`` preset gives on SDXL."""
    import torch
    from lycoris.functional.general import factorization

    from lokr_trainer.lokr.io import write_lokr
    from lokr_trainer.lokr.names import lokr_name_to_sdxl_key, sdxl_module_table
    from lokr_trainer.lokr.targets import LoKrConfig
    from lokr_trainer.sdxl.reference import sdxl_base_shapes

    shapes = sdxl_base_shapes()
    table = sdxl_module_table()
    chosen = LoKrConfig.from_preset("kohaku-xl-delta").resolve(table)
    g = torch.Generator().manual_seed(seed)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    counts: dict[str, int] = {}
    for entry, settings in chosen:
        key, qkv = lokr_name_to_sdxl_key(entry.lokr_name)
        shape = shapes[key]
        if qkv is not None:
            shape = (shape[0] // 3, *shape[1:])
        out_l, out_k = factorization(shape[0], settings.factor)
        in_m, in_n = factorization(shape[1], settings.factor)
        # small values: ΔW ~ 1e-4, like a trained adapter, so fp16 never overflows
        w1 = torch.randn((out_l, in_m), generator=g) * 0.01
        w2 = torch.randn((out_k, in_n, *shape[2:]), generator=g) * 0.01
        modules[entry.lokr_name] = {"alpha": torch.tensor(float(10**5)), "lokr_w1": w1, "lokr_w2": w2}
        counts[entry.component] = counts.get(entry.component, 0) + 1
    meta = {"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sdxl_base_v1-0",
            "modelspec.title": "random kohaku-xl-delta-shaped LoKr (benchmark)"}
    write_lokr(path, modules, meta, dtype=torch.float16)
    return counts


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Wall seconds of ``cmd`` then ``sync`` (so dirty pages are on disk when the clock stops)."""
    subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return wall, p.stdout + p.stderr


def spot_check(base: Path, lokr: Path, out: Path, n: int = 6) -> int:
    """Recompute a few baked tensors from the inputs (fp32 formula, one rounding) and compare."""
    import torch

    from lokr_trainer.lokr.io import load_lokr
    from lokr_trainer.lokr.names import lokr_name_to_sdxl_key
    from lokr_trainer.safetensors_io import SafetensorsReader

    lf = load_lokr(lokr)
    names = sorted(lf.modules)
    picks = [names[i * (len(names) - 1) // (n - 1)] for i in range(n)]
    bad = 0
    with SafetensorsReader(base) as b, SafetensorsReader(out) as o:
        for name in picks:
            key, qkv = lokr_name_to_sdxl_key(name)
            w, got = b.get(key).float(), o.get(key)
            rows = slice(None) if qkv is None else slice(qkv * w.shape[0] // 3, (qkv + 1) * w.shape[0] // 3)
            t = lf.modules[name].tensors
            w1, w2 = t["lokr_w1"].float(), t["lokr_w2"].float()
            if w2.dim() == 4:
                w1 = w1[:, :, None, None]
            want = (w[rows] + torch.kron(w1, w2).reshape(w[rows].shape)).to(torch.float16)
            if not torch.equal(got[rows], want):
                bad += 1
                print(f"  MISMATCH {name} -> {key}")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="where to write ~21 GB at most (default: a temp folder)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=None, help="passed to the merge (--workers)")
    ap.add_argument("--keep", action="store_true", help="keep the random base and LoKr for the next run")
    args = ap.parse_args()

    folder = Path(args.dir or tempfile.mkdtemp(prefix="lokr_merge_bench_"))
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "random_sdxl_fp16.safetensors"
    lokr = folder / "random_kohaku_xl_delta_lokr.safetensors"
    copy, out = folder / "copy.safetensors", folder / "baked.safetensors"
    created = []
    try:
        if not base.exists():
            from lokr_trainer.testing import write_random_sdxl

            t = time.perf_counter()
            write_random_sdxl(base)
            created.append(base)
            print(f"wrote {base} ({base.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")
        if not lokr.exists():
            t = time.perf_counter()
            counts = write_lokr_like_kohaku(lokr)
            created.append(lokr)
            print(f"wrote {lokr} ({lokr.stat().st_size / 1e6:.1f} MB, modules {counts}) in {time.perf_counter() - t:.0f} s")

        bake = ["/usr/bin/time", "-v", sys.executable, "-m", "lokr_trainer.merge", "--base", str(base),
                "--lokr", str(lokr), "--out", str(out), "--dtype", "fp16", "--overwrite", "--no-progress"]
        if args.workers is not None:
            bake += ["--workers", str(args.workers)]
        for stale in (copy, out):
            stale.unlink(missing_ok=True)
        dry, dry_out = timed([sys.executable, "-m", "lokr_trainer.merge", "--base", str(base), "--lokr", str(lokr),
                              "--out", str(out), "--dry-run"])
        expected = re.search(r"expected peak memory: ([^\n]+)", dry_out)
        print(f"dry run: {dry:.1f} s; {expected.group(0) if expected else '(no estimate)'}")
        results = []
        for run in range(1, args.runs + 1):
            load = os.getloadavg()
            cp_wall, _ = timed(["cp", str(base), str(copy)])
            copy.unlink()
            bake_wall, log = timed(bake)
            m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log)
            rss = int(m.group(1)) * 1024 if m else -1
            r = {"run": run, "load_avg_1m": round(load[0], 2), "cp_s": round(cp_wall, 2), "bake_s": round(bake_wall, 2),
                 "ratio": round(bake_wall / cp_wall, 2), "peak_rss_gb": round(rss / 1e9, 3)}
            results.append(r)
            print(f"run {run}: load {load[0]:.2f}  cp+sync {cp_wall:.1f} s  bake+sync {bake_wall:.1f} s  "
                  f"ratio {bake_wall / cp_wall:.2f}x  peak RSS {rss / 1e9:.2f} GB")
            if run == args.runs:
                bad = spot_check(base, lokr, out)
                print(f"spot check of 6 baked tensors against W + kron(w1, w2) rounded to fp16: {'OK' if not bad else f'{bad} WRONG'}")
            out.unlink()
        print(json.dumps({"base_bytes": base.stat().st_size, "lokr_bytes": lokr.stat().st_size, "runs": results}))
    finally:
        for p in (copy, out):
            p.unlink(missing_ok=True)
        if not args.keep:
            for p in (base, lokr):
                p.unlink(missing_ok=True)
            if args.dir is None:
                shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
