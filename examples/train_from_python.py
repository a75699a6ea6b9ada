"""Train a LoKr adapter from your own script with the library API (no CLI).

    python examples/train_from_python.py                       # the tiny fixture, seconds on a CPU
    python examples/train_from_python.py --model sd_xl_base_1.0.safetensors --data /data/images \
        --resolution 1024 --steps 2000 --out runs/mine

The defaults are the names the docs use for the tiny test fixture; replace them
with your checkpoint and image folder.  Two ways to build the config are shown:
from a TOML file (``--config``) with overrides, or as a plain dict.
"""

from __future__ import annotations

import argparse

from lokr_trainer.config import RunConfig, load_config
from lokr_trainer.lokr.io import load_lokr
from lokr_trainer.train.loop import Trainer, TrainerHooks


def build_config(args: argparse.Namespace) -> RunConfig:
    if args.config:
        # a recipe file, with --set style overrides for what differs on this machine
        return load_config(args.config, [f"model.path={args.model}", f"data.path={args.data}",
                                         f"train.output_dir={args.out}", f"train.max_steps={args.steps}",
                                         "train.epochs=0"])
    # or the whole config as a dict: the same tables and keys as a TOML file
    # (docs/config-reference.md lists every key); invalid values raise ConfigError naming the key
    return RunConfig.from_dict({
        "model": {"path": args.model},
        "lokr": {"preset": "kohaku-xl-delta"},        # full-matrix LoKr, factors 2-8, UNet + both TEs
        "data": {"path": [args.data], "resolution": args.resolution,
                 "min_bucket": args.resolution // 2, "max_bucket": args.resolution * 2,
                 "bucket_step": 16 if args.resolution < 256 else 64, "num_workers": 0},
        "caption": {"shuffle_general": True, "tag_dropout": 0.1},
        "diffusion": {"min_snr_gamma": 5.0},
        "optimizer": {"name": "adamw", "unet_lr": 1e-3, "te1_lr": 5e-4, "te2_lr": 5e-4},
        "train": {"output_dir": args.out, "seed": 0, "batch_size": 2, "max_steps": args.steps,
                  "save_dtype": "fp32"},
    })


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/sdxl-base.safetensors", help="SDXL checkpoint or diffusers folder")
    p.add_argument("--data", default="data/images", help="image folder with .txt/.json sidecars, or a .jsonl")
    p.add_argument("--out", default="runs/from-python", help="output folder (must not hold a run)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps")
    p.add_argument("--resolution", type=int, default=64, help="bucket resolution (64 = the tiny fixture; 1024 for SDXL)")
    p.add_argument("--config", default="", help="start from this run config TOML instead of the dict below")
    args = p.parse_args()

    cfg = build_config(args)
    # hooks are optional: after_step runs after every optimizer step (here: print progress)
    hooks = TrainerHooks(after_step=lambda trainer, step: print(f"step {step} done"))
    result = Trainer(cfg, hooks=hooks, progress=False).fit()

    # the TrainResult says what happened and where the adapter is
    print(f"trained {result.steps_done} of {result.total_steps} steps in {result.seconds:.1f} s "
          f"({result.stopped}); skipped steps {result.skipped_steps}, skipped images {result.skipped_images}")
    print("loss per step:", " ".join(f"{x:.4f}" for x in result.losses))
    lokr = load_lokr(result.adapter)  # the file ComfyUI, A1111/Forge and LyCORIS load
    print(f"adapter: {result.adapter} ({len(lokr.modules)} LoKr modules); config: {result.output_dir / 'config.toml'}")
    assert result.steps_done == args.steps and len(result.losses) == args.steps


if __name__ == "__main__":
    main()
