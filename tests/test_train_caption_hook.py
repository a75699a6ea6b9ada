"""``TrainerHooks.caption``: a custom caption processor after the built-in Kohaku captions.

It must see the built-in caption of each sample, get a generator seeded per
sample (so runs stay reproducible), change what the model trains on, and be
refused together with the text-encoder cache that would skip it.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lokr_trainer.config import RunConfig
from lokr_trainer.data import Captioner, open_source
from lokr_trainer.data.tags import CaptionConfig
from lokr_trainer.errors import ConfigError
from lokr_trainer.testing import make_tiny_dataset
from lokr_trainer.train.loop import CAPTION_HOOK_STREAM, HookedCaptioner, Trainer, TrainerHooks


def add_style(caption: str, record, rng: np.random.Generator) -> str:
    """A processor of the kind users write: append one of two style tags, drawn from rng."""
    return caption + ", " + ("watercolor" if rng.random() < 0.5 else "lineart")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), n=4, seed=0)


def test_the_hook_gets_the_builtin_caption_and_a_per_sample_generator(images):
    records = list(open_source(str(images)))
    cfg = CaptionConfig(shuffle_general=True, tag_dropout=0.3)
    seen = []

    def spy(caption, record, rng):
        seen.append((caption, record.key))
        return add_style(caption, record, rng)

    hooked = HookedCaptioner(records, cfg, 7, spy)
    plain = Captioner(records, cfg, seed=7)
    for epoch in (0, 1):
        for index, rec in enumerate(records):
            rng = np.random.default_rng([7, epoch, index, CAPTION_HOOK_STREAM])
            want = add_style(plain(rec, epoch, index), rec, rng)
            assert hooked(rec, epoch, index) == want
            assert seen[-1] == (plain(rec, epoch, index), rec.key)
            assert hooked(rec, epoch, index) == want  # same (seed, epoch, index): same caption
    # the draws differ between samples (not one process RNG reused)
    draws = {np.random.default_rng([7, 0, i, CAPTION_HOOK_STREAM]).random() for i in range(8)}
    assert len(draws) == 8
    # DataLoader workers get a pickled copy
    styled = HookedCaptioner(records, cfg, 7, add_style)
    clone = pickle.loads(pickle.dumps(styled))
    assert clone(records[0], 3, 2) == styled(records[0], 3, 2)


def test_a_hook_that_returns_no_string_is_a_clear_error(images):
    records = list(open_source(str(images)))
    bad = HookedCaptioner(records, CaptionConfig(), 0, lambda c, r, g: None)
    with pytest.raises(Exception, match=r"TrainerHooks\.caption returned NoneType for .*; it must return a str"):
        bad(records[0])


def config(tiny_sdxl, images: Path, out: Path, **data) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"path": str(tiny_sdxl.single_file)},
        "lokr": {"preset": "kohaku-xl-delta", "exclude": ["*emb_layers*"]},
        "data": {"path": [str(images)], "resolution": 64, "min_bucket": 32, "max_bucket": 128,
                 "bucket_step": 16, "num_workers": 0, **data},
        "caption": {"tag_dropout": 0.1},
        "optimizer": {"name": "adamw", "unet_lr": 1e-3, "te1_lr": 1e-3, "te2_lr": 1e-3},
        "train": {"output_dir": str(out), "seed": 1, "batch_size": 2, "max_steps": 2, "save_dtype": "fp32"},
    })


def test_a_run_with_the_hook_is_reproducible_and_trains_on_its_captions(tiny_sdxl, images, tmp_path):
    keys = []

    def spy(caption, record, rng):
        keys.append(record.key)
        return add_style(caption, record, rng)

    def run(name, hooks=None):
        result = Trainer(config(tiny_sdxl, images, tmp_path / name), hooks=hooks, progress=False).fit()
        return load_file(str(result.adapter))

    a = run("a", TrainerHooks(caption=spy))
    assert len(keys) == 4 and set(keys) <= {r.key for r in open_source(str(images))}  # 2 steps × batch 2
    b = run("b", TrainerHooks(caption=add_style))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    plain = run("plain")
    te = [k for k in a if k.startswith("lora_te") and k.endswith("lokr_w2")]
    assert te and any(not torch.equal(a[k], plain[k]) for k in te)  # other captions, other text-encoder updates


def test_the_hook_and_the_text_encoder_cache_are_refused_together(tiny_sdxl, images, tmp_path):
    d = config(tiny_sdxl, images, tmp_path / "x", cache_text=True).to_dict()
    d["train"]["train_text_encoders"] = False  # what the text cache needs otherwise
    d["caption"].update(tag_dropout=0.0, shuffle_general=False)
    cfg = RunConfig.from_dict(d)
    Trainer(cfg, progress=False)  # allowed without the hook
    with pytest.raises(ConfigError, match="data.cache_text cannot be used with a TrainerHooks.caption"):
        Trainer(cfg, hooks=TrainerHooks(caption=add_style), progress=False)
