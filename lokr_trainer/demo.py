"""End-to-end demo on the embedded tiny SDXL: ``python -m lokr_trainer.demo``.

Runs offline on a CPU in about a minute and does what a real run does with a
7 GB checkpoint: write an SDXL model in both layouts, load each, check they
agree bit for bit, save again and verify the round trip; write a small
captioned image set, train ``configs/demo.toml`` (the ``kohaku-xl-delta``
LoKr on the UNet and both text encoders, cached latents, validation loss at
fixed noise), bake the trained adapter with ``python -m lokr_trainer.merge``,
and check that the baked model equals the base with the adapter attached.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from lokr_trainer.errors import LokrTrainerError

#: The run config the demo trains (tiny model, CPU, about a minute).
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"


def run(out_dir: Path, seed: int = 0, progress: bool = False) -> dict[str, object]:
    """Do the demo; return the report as a dict (also used by the tests)."""
    from lokr_trainer.safetensors_io import SafetensorsReader
    from lokr_trainer.sdxl import load_sdxl, save_sdxl
    from lokr_trainer.sdxl.keys import COMPONENTS, component_of
    from lokr_trainer.testing import make_tiny_sdxl
    from lokr_trainer.units import fmt_bytes

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
    resaved = save_sdxl(single, out_dir / "tiny_sdxl_resaved_fp16.safetensors", dtype=torch.float16, overwrite=True)
    with SafetensorsReader(paths.single_file) as a, SafetensorsReader(resaved) as b:
        same_keys = set(a.keys()) == set(b.keys())
        keys_per_component = {c: sum(component_of(k) == c for k in a.keys()) for c in COMPONENTS}
        max_err = max(
            (a.get(k).float() - b.get(k).float()).abs().max().item()
            for k in a.keys()
            if a.get(k).is_floating_point()
        )
    params = {c: sum(p.numel() for p in getattr(single, c).parameters()) for c in COMPONENTS}
    trained = _train_and_bake(paths.single_file, out_dir, seed, progress)
    return {
        **trained,
        "single_file": str(paths.single_file),
        "diffusers_dir": str(paths.diffusers_dir),
        "keys_per_component": keys_per_component,
        "params_per_component": params,
        "layouts_bit_identical": identical,
        "fp16_resave": str(resaved),
        "fp16_resave_same_keys": same_keys,
        "fp16_resave_max_abs_error": max_err,
        "seconds": {"make": round(t_make, 2), "load_both": round(t_load, 2)},
        "file_size": fmt_bytes(paths.single_file.stat().st_size),
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


def _te_outputs(models, seed: int) -> torch.Tensor:
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    with torch.no_grad():
        h1 = models.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        h2 = models.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2]
    return torch.cat([h1.flatten(), h2.flatten()])


def _train_and_bake(base: Path, out_dir: Path, seed: int, progress: bool) -> dict[str, object]:
    """Train configs/demo.toml on a generated image set, bake with the merge CLI, check baked == adapted."""
    from lokr_trainer.config import load_config
    from lokr_trainer.lokr.attach import attach_lokr_from_file
    from lokr_trainer.merge.__main__ import main as merge_main
    from lokr_trainer.sdxl import load_sdxl
    from lokr_trainer.testing import make_tiny_dataset
    from lokr_trainer.train.loop import Trainer

    data = make_tiny_dataset(out_dir / "data", n=8, seed=seed)
    run_dir = out_dir / "run"
    if run_dir.exists():  # the demo always starts afresh
        import shutil

        shutil.rmtree(run_dir)
    overrides = [
        f"model.path={base}",
        f"data.path=[{str(data)!r}]",
        f"validation.path=[{str(data)!r}]",
        f"train.output_dir={run_dir}",
        f"train.seed={seed}",
    ]
    cfg = load_config(DEMO_CONFIG, overrides)
    trainer = Trainer(cfg, progress=progress)
    t0 = time.perf_counter()
    result = trainer.fit()
    t_train = time.perf_counter() - t0
    if result.adapter is None:  # Ctrl-C / SIGTERM: the trainer saved a state and stopped early
        raise KeyboardInterrupt(f"after step {result.start_step + result.steps_done} of {result.total_steps}")
    val = trainer.validation_history

    baked = out_dir / "tiny_sdxl_trained_baked.safetensors"
    t0 = time.perf_counter()
    rc = merge_main(["--base", str(base), "--lokr", f"{result.adapter}:1.0", "--out", str(baked),
                     "--dtype", "fp32", "--overwrite", "--no-progress"])
    t_bake = time.perf_counter() - t0
    adapted = load_sdxl(base)
    attach_lokr_from_file(adapted, result.adapter)
    merged = load_sdxl(baked)
    diff_unet = (_unet_output(adapted, seed) - _unet_output(merged, seed)).abs().max().item()
    diff_te = (_te_outputs(adapted, seed) - _te_outputs(merged, seed)).abs().max().item()
    plain = load_sdxl(base)
    changed = not torch.allclose(_unet_output(plain, seed), _unet_output(adapted, seed))
    return {
        "data_dir": str(data),
        "run_dir": str(run_dir),
        "config": str(run_dir / "config.toml"),
        "adapter": str(result.adapter),
        "samples": sorted(str(p) for p in (run_dir / "samples").rglob("*.png")),
        "steps": result.steps_done,
        "train_seconds": round(t_train, 1),
        "train_loss_first_last": (_mean(result.losses[:10]), _mean(result.losses[-10:])),
        "validation_losses": val,
        "merge_exit_code": rc,
        "baked_file": str(baked),
        "bake_seconds": round(t_bake, 2),
        "baked_vs_adapted_max_abs_diff": max(diff_unet, diff_te),
        "adapter_changes_output": changed,
    }


def _mean(xs: list[float]) -> float:
    return sum(xs) / max(1, len(xs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lokr_trainer.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default: demo_output)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = run(args.out, args.seed, progress=not args.no_progress)
    except KeyboardInterrupt as e:
        where = f" {e.args[0]}" if e.args else ""
        print(f"demo interrupted{where}: nothing baked or checked; run it again to start afresh", file=sys.stderr)
        return 130
    except LokrTrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        print("demo FAILED")
        return 1
    return 0 if print_report(report) else 1


def print_report(report: dict[str, object]) -> bool:
    """Print what the demo did; True when every check passed."""
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
    first, last = report["train_loss_first_last"]  # type: ignore[misc]
    print(f"training (configs/demo.toml, kohaku-xl-delta LoKr on UNet + both TEs, {report['steps']} steps, "
          f"{report['train_seconds']} s):")
    print(f"  training loss     mean of first 10 steps {first:.4f} -> last 10 steps {last:.4f}")
    curve = ", ".join(f"step {s}: {v:.4f}" for s, v in report["validation_losses"])  # type: ignore[union-attr]
    print(f"  validation loss   (fixed noise and timesteps) {curve}")
    print(f"  images + captions {report['data_dir']}")
    print(f"  resolved config   {report['config']}")
    print(f"  adapter           {report['adapter']}")
    for p in report["samples"]:  # type: ignore[union-attr]
        print(f"  sample image      {p}")
    print(f"  TensorBoard logs  {report['run_dir']}/logs  (tensorboard --logdir {report['run_dir']}/logs)")
    print(
        f"baked with python -m lokr_trainer.merge in {report['bake_seconds']} s -> {report['baked_file']}; "
        f"baked vs adapted model (UNet + both TEs) max |diff| {report['baked_vs_adapted_max_abs_diff']:.2e}"
    )
    vals = [v for _, v in report["validation_losses"]]  # type: ignore[union-attr]
    ok = (
        bool(report["layouts_bit_identical"])
        and bool(report["fp16_resave_same_keys"])
        and bool(report["adapter_changes_output"])
        and report["merge_exit_code"] == 0
        and float(report["baked_vs_adapted_max_abs_diff"]) <= 1e-5  # type: ignore[arg-type]
        and len(vals) >= 2
        and vals[-1] < vals[0]
    )
    print("demo OK" if ok else "demo FAILED")
    return ok


if __name__ == "__main__":
    sys.exit(main())
