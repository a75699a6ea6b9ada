"""End-to-end demo on the embedded tiny SDXL: ``python -m lokr_trainer.demo``.

Runs offline on a CPU in seconds and exercises what a real run does with a
7 GB checkpoint: write an SDXL model in both layouts, load each, check they
agree bit for bit, save again and verify the round trip; attach LoKr
adapters (the ``kohaku-xl-delta`` preset) to the UNet and both text
encoders, give them non-zero weights, save the adapter file, bake it into a
full checkpoint with the streaming merge, and check that the baked model
equals the base with the adapter attached.  Training extends this command
when the training engine lands.
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
    lokr = _lokr_and_merge(paths.single_file, out_dir, seed)
    return {
        **lokr,
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


def _unet_output(models, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = models.unet.config
    sample = torch.randn(1, cfg.in_channels, 16, 16, generator=g)
    ctx = torch.randn(1, 7, cfg.cross_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim, generator=g)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    with torch.no_grad():
        return models.unet(
            sample, torch.tensor([500]), ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample


def _lokr_and_merge(base: Path, out_dir: Path, seed: int) -> dict[str, object]:
    """Adapter on the tiny model, saved, baked by the streaming merge, checked."""
    from lokr_trainer.lokr import LoKrConfig, attach_lokr
    from lokr_trainer.merge import bake_lokr
    from lokr_trainer.sdxl import load_sdxl

    models = load_sdxl(base)
    net = attach_lokr(models, LoKrConfig.from_preset("kohaku-xl-delta"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # LoKr starts at ΔW = 0; give it something to bake
        for p in net.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    summary = str(net.summary(torch.float32))
    attached = _unet_output(models, seed)
    adapter = net.save(out_dir / "demo_lokr.safetensors", dtype=torch.float32)
    t0 = time.perf_counter()
    result = bake_lokr(base, [f"{adapter}:1.0"], out_dir / "tiny_sdxl_baked.safetensors", dtype="fp32",
                       overwrite=True, progress=False)
    t_bake = time.perf_counter() - t0
    baked = _unet_output(load_sdxl(result.out), seed)
    return {
        "lokr_summary": summary,
        "lokr_file": str(adapter),
        "baked_file": str(result.out),
        "bake_seconds": round(t_bake, 2),
        "baked_vs_attached_max_abs_diff": (baked - attached).abs().max().item(),
        "adapter_changes_output": not torch.allclose(attached, _unet_output(load_sdxl(base), seed)),
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
    print("LoKr adapter (kohaku-xl-delta preset on the tiny model):")
    print("  " + str(report["lokr_summary"]).replace("\n", "\n  "))
    print(f"  adapter file {report['lokr_file']}")
    print(
        f"  baked with the streaming merge in {report['bake_seconds']} s -> {report['baked_file']}; "
        f"baked UNet vs base+adapter max |diff| {report['baked_vs_attached_max_abs_diff']:.2e}"
    )
    ok = (
        bool(report["layouts_bit_identical"])
        and bool(report["fp16_resave_same_keys"])
        and bool(report["adapter_changes_output"])
        and float(report["baked_vs_attached_max_abs_diff"]) <= 1e-5  # type: ignore[arg-type]
    )
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
