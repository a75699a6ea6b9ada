"""A custom caption processor: your own rules on top of the built-in Kohaku XL captions.

    python examples/custom_captions.py                         # the tiny fixture
    python examples/custom_captions.py --model sd_xl_base_1.0.safetensors --data /data/images \
        --trigger "my style" --resolution 1024 --steps 1000

``TrainerHooks(caption=fn)`` calls ``fn(caption, record, rng)`` for every sample,
*after* the ``[caption]`` table's processing (quality/rating/date tags, tag shuffle,
tag and group dropout).  ``record`` is the sample's :class:`SampleRecord` (tags by
category, rating, fav_count, year, caption); ``rng`` is a numpy Generator seeded from
(seed, epoch, sample index), so draw every random choice from it and the run stays
reproducible and the same on any number of GPUs or workers.  The function must be
defined at module level (DataLoader workers get a pickled copy).  It cannot be
combined with ``data.cache_text`` (cached captions would skip it).
"""

from __future__ import annotations

import argparse
import functools

import numpy as np

from lokr_trainer.config import RunConfig
from lokr_trainer.data import Captioner, SampleRecord, open_source
from lokr_trainer.train.loop import HookedCaptioner, Trainer, TrainerHooks


def add_trigger(caption: str, record: SampleRecord, rng: np.random.Generator, *, trigger: str,
                synonyms: dict[str, str]) -> str:
    """Put a trigger word first and, half of the time, swap tags for a synonym."""
    items = [t for t in caption.split(", ") if t]
    if rng.random() < 0.5:
        items = [synonyms.get(t, t) for t in items]
    return ", ".join([trigger] + items)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/sdxl-base.safetensors", help="SDXL checkpoint or diffusers folder")
    p.add_argument("--data", default="data/images", help="image folder with .txt/.json sidecars, or a .jsonl")
    p.add_argument("--out", default="runs/custom-captions", help="output folder")
    p.add_argument("--trigger", default="tiny shapes style", help="the trigger word put first in every caption")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps")
    p.add_argument("--resolution", type=int, default=64, help="bucket resolution (64 = the tiny fixture; 1024 for SDXL)")
    args = p.parse_args()

    # functools.partial of a module-level function pickles fine for DataLoader workers
    processor = functools.partial(add_trigger, trigger=args.trigger,
                                  synonyms={"simple background": "plain background", "no humans": "no people"})
    cfg = RunConfig.from_dict({
        "model": {"path": args.model},
        "lokr": {"preset": "kohaku-xl-delta"},
        "data": {"path": [args.data], "resolution": args.resolution, "min_bucket": args.resolution // 2,
                 "max_bucket": args.resolution * 2, "bucket_step": 16 if args.resolution < 256 else 64,
                 "num_workers": 0},
        "caption": {"shuffle_general": True, "tag_dropout": 0.1},  # the built-in processing runs first
        "optimizer": {"name": "adamw", "unet_lr": 1e-3, "te1_lr": 5e-4, "te2_lr": 5e-4},
        "train": {"output_dir": args.out, "seed": 0, "batch_size": 2, "max_steps": args.steps},
    })

    # preview: the built-in caption and what the processor makes of it, for the first samples of epoch 0
    records = list(open_source(args.data))[:3]
    builtin = Captioner(records, cfg.caption, seed=cfg.train.seed)
    custom = HookedCaptioner(records, cfg.caption, cfg.train.seed, processor)  # what the trainer uses
    for i, rec in enumerate(records):
        print(f"{rec.key}:\n  built-in: {builtin(rec, 0, i)}\n  custom:   {custom(rec, 0, i)}")
        assert custom(rec, 0, i).startswith(args.trigger + ", ")
        assert custom(rec, 0, i) == custom(rec, 0, i)  # same (seed, epoch, index): same caption

    result = Trainer(cfg, hooks=TrainerHooks(caption=processor), progress=False).fit()
    print(f"trained {result.steps_done} steps with custom captions: {result.adapter}")
    assert result.steps_done == args.steps


if __name__ == "__main__":
    main()
