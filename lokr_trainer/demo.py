"""End-to-end demo on the embedded tiny SDXL: ``python -m lokr_trainer.demo``.

Runs offline on a CPU in seconds and exercises what a real run does with a
7 GB checkpoint: write an SDXL model in both layouts, load each, check they
agree bit for bit, save again and verify the round trip.  Later stages
(training, merging) extend this same command.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def run(out_dir: Path, seed: int = 0) -> dict[str, object]:
    """Do the demo; return the report as a dict (also used by the tests)."""
    from safetensors import safe_open

    from lokr_trainer.sdxl import load_sdxl, save_sdxl
    from lokr_trainer.sdxl.keys import COMPONENTS, component_of
    from lokr_trainer.testing import make_tiny_sdxl

    t0 = time.perf_counter()
    paths = make_tiny_sdxl(out_dir / "tiny_sdxl", seed=seed)
    t_make = time.perf_counter() - t0

    t0 = time.perf_counter()
    single = load_sdxl(paths.single_file)
    folder = load_sdxl(paths.diffusers_dir)
    t_load = time.perf_counter() - t0

    identical = all(
        torch.equal(v, getattr(folder, comp).state_dict()[k])
        for comp in COMPONENTS
        for k, v in getattr(single, comp).state_dict().items()
    )
    resaved = save_sdxl(single, out_dir / "tiny_sdxl_resaved_fp16.safetensors", dtype=torch.float16)
    with safe_open(str(paths.single_file), "pt") as a, safe_open(str(resaved), "pt") as b:
        same_keys = set(a.keys()) == set(b.keys())
        keys_per_component = {c: sum(component_of(k) == c for k in a.keys()) for c in COMPONENTS}
        max_err = max(
            (a.get_tensor(k).float() - b.get_tensor(k).float()).abs().max().item()
            for k in a.keys()
            if a.get_tensor(k).is_floating_point()
        )
    params = {c: sum(p.numel() for p in getattr(single, c).parameters()) for c in COMPONENTS}
    return {
        "single_file": str(paths.single_file),
        "diffusers_dir": str(paths.diffusers_dir),
        "keys_per_component": keys_per_component,
        "params_per_component": params,
        "layouts_bit_identical": identical,
        "fp16_resave": str(resaved),
        "fp16_resave_same_keys": same_keys,
        "fp16_resave_max_abs_error": max_err,
        "seconds": {"make": round(t_make, 2), "load_both": round(t_load, 2)},
        "file_size": _fmt_bytes(paths.single_file.stat().st_size),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lokr_trainer.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default: demo_output)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = run(args.out, args.seed)
    print("lokr_trainer demo — tiny SDXL, offline")
    print(f"  single file      {report['single_file']} ({report['file_size']})")
    print(f"  diffusers folder {report['diffusers_dir']}")
    for comp, n in report["keys_per_component"].items():  # type: ignore[union-attr]
        print(f"  {comp:<15} {n:>5} keys {report['params_per_component'][comp]:>10,} params")  # type: ignore[index]
    print(f"  single-file vs diffusers-folder weights bit-identical: {report['layouts_bit_identical']}")
    print(
        f"  fp16 re-save: same key set {report['fp16_resave_same_keys']}, "
        f"max |error| {report['fp16_resave_max_abs_error']:.2e} -> {report['fp16_resave']}"
    )
    print(f"  timings (s): {report['seconds']}")
    ok = bool(report["layouts_bit_identical"]) and bool(report["fp16_resave_same_keys"])
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
