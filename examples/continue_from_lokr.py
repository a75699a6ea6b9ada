"""Continue training from a published LoKr file instead of starting at ΔW = 0.

    python examples/continue_from_lokr.py                      # the tiny fixture
    python examples/continue_from_lokr.py --model kohaku-xl-delta-base.safetensors \
        --lokr kohaku-xl-delta-lokr.safetensors --data /data/images --resolution 1024 --steps 500

``model.init_lokr`` (a ``[model]`` key, so also ``--set model.init_lokr=FILE`` on the
CLI) loads the file into the adapters the ``[lokr]`` table selects before the first
step.  The file must have exactly those modules and factor shapes (for Kohaku XL
Delta's LoKr: ``preset = "kohaku-xl-delta"``); anything else is refused before
training, naming the file and the first modules that do not fit.  The file's digest
is part of the run's identity, so ``--resume`` refuses a state made from another file.
With ``train.train_text_encoders = false`` (UNet only: less memory, cacheable prompts)
the file's text-encoder modules are baked into the frozen encoders and written,
untrained (in ``train.save_dtype``), into every saved adapter, so the result is still
the whole adapter.

On the tiny fixture there is no published file, so when ``--lokr`` does not exist
this script first makes a stand-in with a short run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from lokr_trainer.config import RunConfig
from lokr_trainer.train.loop import Trainer


def config(args: argparse.Namespace, out: str, steps: int, init_lokr: str = "") -> RunConfig:
    return RunConfig.from_dict({
        "model": {"path": args.model, "init_lokr": init_lokr},
        "lokr": {"preset": "kohaku-xl-delta"},  # must select what the file holds
        "data": {"path": [args.data], "resolution": args.resolution, "min_bucket": args.resolution // 2,
                 "max_bucket": args.resolution * 2, "bucket_step": 16 if args.resolution < 256 else 64,
                 "num_workers": 0},
        "optimizer": {"name": "adamw", "unet_lr": args.lr, "te1_lr": args.lr / 2, "te2_lr": args.lr / 2},
        "train": {"output_dir": out, "seed": 0, "batch_size": 2, "max_steps": steps, "save_dtype": "fp32"},
    })


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/sdxl-base.safetensors", help="the base the LoKr was trained on")
    p.add_argument("--lokr", default="out/published-lokr.safetensors", help="the LoKr file to continue from")
    p.add_argument("--data", default="data/images", help="training images")
    p.add_argument("--out", default="runs/continued", help="output folder of the continued run")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps of the continued run")
    p.add_argument("--resolution", type=int, default=64, help="bucket resolution (64 = the tiny fixture; 1024 for SDXL)")
    p.add_argument("--lr", type=float, default=1e-4, help="UNet learning rate (the TEs get half)")
    args = p.parse_args()

    if not Path(args.lokr).is_file():
        print(f"{args.lokr} does not exist: making a stand-in 'published' LoKr with a 2-step run")
        made = Trainer(config(args, "runs/stand-in", 2), progress=False).fit().adapter
        Path(args.lokr).parent.mkdir(parents=True, exist_ok=True)
        made.replace(args.lokr)

    result = Trainer(config(args, args.out, args.steps, init_lokr=args.lokr), progress=False).fit()
    print(f"continued from {args.lokr} for {result.steps_done} steps; losses",
          " ".join(f"{x:.4f}" for x in result.losses))

    # the continued adapter has the file's modules and moved only a little away from its weights
    start, end = load_file(args.lokr), load_file(str(result.adapter))
    assert set(start) == set(end)
    moved = sum(((end[k].float() - start[k].float()) ** 2).sum() for k in start).sqrt()
    size = sum((start[k].float() ** 2).sum() for k in start).sqrt()
    print(f"adapter: {result.adapter}; moved {float(moved / size):.2e} of the starting adapter's norm")
    assert 0 < moved < size


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
