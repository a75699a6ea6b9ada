"""``model.init_lokr``: a run that starts from a LoKr file (e.g. a published one) instead of ΔW = 0.

One short run writes the "published" file; the tests then start new runs
from it and check the starting adapter is the file's tensors exactly, that a
file that does not fit the ``[lokr]`` selection is refused before training
with the file and modules named, that a continued run moves on from the
file's weights, and that the file is part of the run's identity (resume).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lokr_trainer.config import RunConfig, run_defining_dict
from lokr_trainer.errors import ConfigError
from lokr_trainer.testing import make_tiny_dataset
from lokr_trainer.train.loop import Trainer

LOKR = {"preset": "kohaku-xl-delta", "exclude": ["*emb_layers*"]}


def config(tiny_sdxl, images: Path, out: Path, **tables) -> RunConfig:
    d = {
        "model": {"path": str(tiny_sdxl.single_file)},
        "lokr": dict(LOKR),
        "data": {"path": [str(images)], "resolution": 64, "min_bucket": 32, "max_bucket": 128,
                 "bucket_step": 16, "num_workers": 0},
        "optimizer": {"name": "adamw", "unet_lr": 1e-3, "te1_lr": 5e-4, "te2_lr": 5e-4, "weight_decay": 0.0},
        "scheduler": {"name": "constant"},
        "train": {"output_dir": str(out), "seed": 1, "batch_size": 2, "max_steps": 2, "save_dtype": "fp32"},
    }
    for table, values in tables.items():
        d.setdefault(table, {}).update(values)
    return RunConfig.from_dict(d)


def fit(cfg: RunConfig, **kw):
    return Trainer(cfg, progress=False, **kw).fit()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), n=4, seed=0)


@pytest.fixture(scope="module")
def published(tiny_sdxl, images, tmp_path_factory) -> Path:
    """A trained adapter: non-zero W2 factors, so ΔW = 0 and 'loaded' are told apart."""
    out = tmp_path_factory.mktemp("published")
    result = fit(config(tiny_sdxl, images, out / "run", optimizer={"unet_lr": 2e-2, "te1_lr": 1e-2, "te2_lr": 1e-2}))
    tensors = load_file(str(result.adapter))
    assert any(k.endswith("lokr_w2") and v.abs().max() > 0 for k, v in tensors.items())
    return result.adapter


def _no_lr(**kw) -> dict:
    return {"optimizer": {"unet_lr": 0.0, "te1_lr": 0.0, "te2_lr": 0.0}, **kw}


def test_the_starting_adapter_is_the_files_tensors_exactly(tiny_sdxl, images, published, tmp_path):
    # learning rate 0 with AdamW (no weight decay): the written adapter is the starting adapter
    cfg = config(tiny_sdxl, images, tmp_path / "run", model={"init_lokr": str(published)}, train={"max_steps": 1},
                 **_no_lr())
    result = fit(cfg)
    want, got = load_file(str(published)), load_file(str(result.adapter))
    assert set(got) == set(want)
    different = [k for k in want if not torch.equal(want[k], got[k])]
    assert not different, different[:5]
    # and without init_lokr the same settings start from ΔW = 0 (the W2 factors are zero)
    fresh = load_file(str(fit(config(tiny_sdxl, images, tmp_path / "fresh", train={"max_steps": 1}, **_no_lr())).adapter))
    w2 = [k for k in fresh if k.endswith("lokr_w2")]
    assert w2 and all(fresh[k].abs().max() == 0 for k in w2)
    assert any(not torch.equal(fresh[k], want[k]) for k in w2)


def test_the_init_file_is_in_the_saved_config_and_the_run_identity(tiny_sdxl, images, published, tmp_path):
    cfg = config(tiny_sdxl, images, tmp_path / "run", model={"init_lokr": str(published)})
    assert run_defining_dict(cfg, 1)["model.init_lokr"] == str(published)
    assert RunConfig.from_dict(cfg.to_dict()).model.init_lokr == str(published)


def test_a_file_that_does_not_fit_the_lokr_selection_is_refused_naming_file_and_modules(tiny_sdxl, images, published, tmp_path):
    tensors = load_file(str(published))
    with safe_open(str(published), "pt") as f:
        metadata = f.metadata()
    modules = sorted({k.split(".")[0] for k in tensors})
    dropped, reshaped = modules[0], modules[1]
    bad = {k: v for k, v in tensors.items() if not k.startswith(dropped + ".")}
    w1 = f"{reshaped}.lokr_w1"
    assert w1 in bad, sorted(k for k in bad if k.startswith(reshaped))
    bad[w1] = torch.zeros(bad[w1].shape[0] + 1, bad[w1].shape[1])
    path = tmp_path / "mismatch.safetensors"
    save_file(bad, str(path), metadata=metadata)

    cfg = config(tiny_sdxl, images, tmp_path / "run", model={"init_lokr": str(path)})
    with pytest.raises(ConfigError) as e:
        fit(cfg)
    msg = str(e.value)
    assert msg.startswith(f"model.init_lokr: {path}: ")
    assert dropped in msg and "not in the file" in msg
    assert reshaped in msg
    assert "\n" not in msg
    # refused before training: no adapter, no state written
    assert not (tmp_path / "run" / "lokr.safetensors").exists()
    assert not (tmp_path / "run" / "state").exists()

    # another [lokr] selection than the file's: the file's extra modules are named
    narrow = config(tiny_sdxl, images, tmp_path / "narrow", model={"init_lokr": str(published)},
                    lokr={"components": ["unet"]})
    with pytest.raises(ConfigError, match=r"lora_te1_\w+: a module of this model not selected by this LoKr config"):
        fit(narrow)

    missing = config(tiny_sdxl, images, tmp_path / "missing", model={"init_lokr": str(tmp_path / "nope.safetensors")})
    with pytest.raises(ConfigError, match="model.init_lokr: .*nope.safetensors is not a file"):
        Trainer(missing, progress=False)


def test_a_continued_run_moves_on_from_the_files_weights(tiny_sdxl, images, published, tmp_path):
    start = load_file(str(published))
    lr = {"unet_lr": 1e-4, "te1_lr": 1e-4, "te2_lr": 1e-4}
    cont = load_file(str(fit(config(tiny_sdxl, images, tmp_path / "cont", model={"init_lokr": str(published)},
                                    optimizer=lr)).adapter))
    fresh = load_file(str(fit(config(tiny_sdxl, images, tmp_path / "fresh", optimizer=lr)).adapter))

    def dist(a, b):
        return float(sum(((a[k] - b[k]).double() ** 2).sum() for k in a).sqrt())

    norm = float(sum((v.double() ** 2).sum() for v in start.values()).sqrt())
    # it trained (moved) but stayed next to where it started, far from a fresh run's weights
    assert 0 < dist(cont, start) < 0.05 * norm
    assert dist(fresh, start) > 10 * dist(cont, start)


def test_resume_refuses_another_init_file(tiny_sdxl, images, published, tmp_path):
    init = tmp_path / "init.safetensors"
    init.write_bytes(published.read_bytes())
    out = tmp_path / "run"
    fit(config(tiny_sdxl, images, out, model={"init_lokr": str(init)}, train={"stop_after": 1}))
    # the same path with other bytes: the file's digest is part of the run identity
    tensors = load_file(str(published))
    with safe_open(str(published), "pt") as f:
        metadata = f.metadata()
    save_file({k: v * 2 if k.endswith("lokr_w2") else v for k, v in tensors.items()}, str(init), metadata=metadata)
    with pytest.raises(ConfigError, match=r"cannot resume .*model\.init_lokr_sha256"):
        fit(config(tiny_sdxl, images, out, model={"init_lokr": str(init)}), resume="latest")
    # another path is another run too
    with pytest.raises(ConfigError, match=r"cannot resume .*model\.init_lokr"):
        fit(config(tiny_sdxl, images, out, model={"init_lokr": str(published)}), resume="latest")
    # the original file resumes
    init.write_bytes(published.read_bytes())
    result = fit(config(tiny_sdxl, images, out, model={"init_lokr": str(init)}), resume="latest")
    assert result.start_step == 1 and result.steps_done == 1


def test_frozen_text_encoders_keep_the_files_te_modules_baked_in_and_saved_unchanged(tiny_sdxl, images, published, tmp_path):
    """UNet-only training from a file with TE modules: prompts see the file's TE adapters, every saved
    adapter carries them unchanged, and a resume bakes them again."""
    from lokr_trainer.lokr import attach_lokr_from_file
    from lokr_trainer.sdxl import load_sdxl

    want = load_file(str(published))
    te_keys = {k for k in want if k.startswith("lora_te")}
    assert te_keys and any(k.startswith("lora_unet") for k in want)
    frozen = {"train_text_encoders": False, "max_steps": 2}
    trainer = Trainer(config(tiny_sdxl, images, tmp_path / "run", model={"init_lokr": str(published)}, train=frozen,
                             **_no_lr()), progress=False)
    got = load_file(str(trainer.fit().adapter))
    assert set(got) == set(want)  # the TE modules are in the file, the UNet modules were trained (lr 0: unchanged)
    assert not [k for k in want if not torch.equal(want[k], got[k])]
    with safe_open(str(trainer.output_dir / "lokr.safetensors"), "pt") as f:
        assert f.metadata()["lokr_trainer.kept_modules"].startswith(f"{len({k.split('.')[0] for k in te_keys})} text-encoder")

    # the frozen encoders the run used = the base with the file's TE adapters applied
    reference = load_sdxl(tiny_sdxl.single_file)
    attach_lokr_from_file(reference, published)
    ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 72])
    for name in ("text_encoder", "text_encoder_2"):
        ours, theirs = getattr(trainer.models, name), getattr(reference, name)
        with torch.no_grad():
            a = ours(ids, output_hidden_states=True).hidden_states[-2]
            b = theirs(ids, output_hidden_states=True).hidden_states[-2]
            plain = getattr(load_sdxl(tiny_sdxl.single_file), name)(ids, output_hidden_states=True).hidden_states[-2]
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), name
        assert not torch.allclose(a, plain, atol=1e-3), f"{name}: the file's TE modules changed nothing"

    # stop after 1 step and resume: the final adapter still carries the TE modules unchanged
    out = tmp_path / "resumed"
    cfg = config(tiny_sdxl, images, out, model={"init_lokr": str(published)}, train={**frozen, "stop_after": 1})
    fit(cfg)
    final = load_file(str(fit(cfg, resume="latest").adapter))
    assert {k for k in final if k.startswith("lora_te")} == te_keys
    assert all(torch.equal(final[k], want[k]) for k in te_keys)


def test_trained_text_encoders_without_te_modules_in_lokr_name_the_frozen_alternative(tiny_sdxl, images, published, tmp_path):
    narrow = config(tiny_sdxl, images, tmp_path / "narrow", model={"init_lokr": str(published)},
                    lokr={"components": ["unet"]})
    with pytest.raises(ConfigError, match=r"set train\.train_text_encoders = false\)$"):
        fit(narrow)
