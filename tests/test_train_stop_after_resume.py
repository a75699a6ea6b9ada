"""``train.stop_after`` on resume: a stop step the run already reached does not stop it again.

The resolved ``config.toml`` a run writes keeps ``stop_after``; the documented way to continue
(``--config runs/x/config.toml --resume latest``) must train to the end, and a later
``stop_after`` must still stop there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lokr_trainer.config import RunConfig
from lokr_trainer.testing import make_tiny_dataset
from lokr_trainer.train.checkpoint import list_states
from lokr_trainer.train.loop import Trainer


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), n=8, seed=0)


def _config(tiny_sdxl, images: Path, out: Path, **train) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"path": str(tiny_sdxl.single_file)},
        "lokr": {"preset": "attn"},
        "data": {"path": [str(images)], "resolution": 64, "min_bucket": 32, "max_bucket": 128,
                 "bucket_step": 16, "num_workers": 0},
        "optimizer": {"name": "adamw", "unet_lr": 1e-3},
        "train": {"output_dir": str(out), "seed": 1, "batch_size": 2, "max_steps": 4, "save_dtype": "fp32",
                  "log_every": 0, **train},
    })


def _fit(cfg: RunConfig, **kw):
    return Trainer(cfg, progress=False, **kw).fit()


def test_resume_with_the_saved_stop_after_runs_to_the_end_and_equals_a_straight_run(tiny_sdxl, images, tmp_path):
    straight = _fit(_config(tiny_sdxl, images, tmp_path / "straight"))
    out = tmp_path / "run"
    first = _fit(_config(tiny_sdxl, images, out, stop_after=2))
    assert first.stopped == "stop_after" and [s for s, _ in list_states(out / "state")] == [2]
    # the same config again (what config.toml holds), resumed: stop_after = 2 is already behind it
    second = _fit(_config(tiny_sdxl, images, out, stop_after=2), resume="latest")
    assert (second.start_step, second.steps_done, second.stopped) == (2, 2, "done")
    a, b = load_file(str(straight.adapter)), load_file(str(second.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_later_stop_after_still_stops_a_resumed_run(tiny_sdxl, images, tmp_path):
    out = tmp_path / "run"
    _fit(_config(tiny_sdxl, images, out, stop_after=1))
    again = _fit(_config(tiny_sdxl, images, out, stop_after=3), resume="latest")
    assert (again.start_step, again.steps_done, again.stopped, again.adapter) == (1, 2, "stop_after", None)
    assert [s for s, _ in list_states(out / "state")][-1] == 3
