"""A baked file behaves like the base with the adapters attached (fp32, <= 1e-5)."""

from __future__ import annotations

import pytest
import torch

from lokr_trainer.lokr.attach import attach_lokr, attach_lokr_from_file
from lokr_trainer.lokr.io import save_lokr
from lokr_trainer.lokr.targets import FactorRule, LoKrConfig
from lokr_trainer.merge import bake_lokr
from lokr_trainer.safetensors_io import read_header
from lokr_trainer.sdxl import load_sdxl

#: Full-matrix LoKr on every kind of module (UNet convs, attention, feed-forward, both TEs).
FULL = LoKrConfig(targets="full", factor=4, rules=(FactorRule(kind=("attn",), factor=2),))
#: Decomposed W2 with alpha != dim (scale 1.5) on attention, feed-forward and both TEs.
DECOMPOSED = LoKrConfig(
    targets="attn-mlp", factor=4, full_matrix=False, dim=2, alpha=3.0,
    rules=(FactorRule(kind=("ff",), factor=2),),
)
#: Tucker-decomposed W2 (lokr_t2) on the UNet's 3x3 convs, decomposed elsewhere.
TUCKER = LoKrConfig(targets="full", factor=2, full_matrix=False, dim=2, alpha=1.0, use_tucker=True,
                    components=("unet",))


def _inputs():
    g = torch.Generator().manual_seed(5)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "t": torch.tensor([10, 700]),
        "ctx": torch.randn(2, 7, 64, generator=g),
        "text_embeds": torch.randn(2, 32, generator=g),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 80, 8, 0, 64, 64]]),
        "ids": torch.randint(0, 49408, (2, 11), generator=g),
    }


@torch.no_grad()
def _outputs(models, x):
    u = models.unet(x["sample"], x["t"], encoder_hidden_states=x["ctx"],
                    added_cond_kwargs={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}).sample
    te1 = models.text_encoder(x["ids"], output_hidden_states=True)
    te2 = models.text_encoder_2(x["ids"], output_hidden_states=True)
    return {"unet": u, "te1": te1.hidden_states[-2], "te2": te2.hidden_states[-2], "te2_pooled": te2.text_embeds}


def _random_lokr(base_file, config, path, seed):
    models = load_sdxl(base_file)
    net = attach_lokr(models, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_lokr(net, path, dtype=torch.float32)
    return path


def _assert_close(got, want):
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def lokrs(tiny_sdxl, tmp_path_factory):
    d = tmp_path_factory.mktemp("merge_equiv")
    files = {
        "full": _random_lokr(tiny_sdxl.single_file, FULL, d / "full.safetensors", 1),
        "decomposed": _random_lokr(tiny_sdxl.single_file, DECOMPOSED, d / "decomposed.safetensors", 2),
        "tucker": _random_lokr(tiny_sdxl.single_file, TUCKER, d / "tucker.safetensors", 3),
    }
    kinds = {n: {k.rsplit(".", 1)[1] for k in read_header(p).tensors} for n, p in files.items()}
    assert "lokr_w2" in kinds["full"] and "lokr_w2_b" not in kinds["full"]
    assert "lokr_w2_b" in kinds["decomposed"] and "lokr_t2" in kinds["tucker"]
    return files


@pytest.mark.parametrize("name,m", [("full", 1.0), ("decomposed", 0.5), ("tucker", -0.8)])
def test_baked_file_equals_attached_adapter(tiny_sdxl, lokrs, tmp_path, name, m):
    out = tmp_path / "baked.safetensors"
    bake_lokr(tiny_sdxl.single_file, [(lokrs[name], m)], out, dtype="fp32", progress=False)
    x = _inputs()
    baked = _outputs(load_sdxl(out), x)
    models = load_sdxl(tiny_sdxl.single_file)
    net = attach_lokr_from_file(models, lokrs[name])
    net.set_multiplier(m)
    want = _outputs(models, x)
    with net.disabled():
        plain = _outputs(models, x)
    assert not torch.allclose(want["unet"], plain["unet"], atol=1e-4)  # the adapter does change the output
    _assert_close(baked, want)


def test_two_baked_lokrs_equal_attaching_them_in_turn(tiny_sdxl, lokrs, tmp_path):
    out = tmp_path / "two.safetensors"
    bake_lokr(tiny_sdxl.single_file, [(lokrs["full"], 0.7), (lokrs["decomposed"], 1.3)], out, dtype="fp32",
              progress=False)
    x = _inputs()
    baked = _outputs(load_sdxl(out), x)
    models = load_sdxl(tiny_sdxl.single_file)
    first = attach_lokr_from_file(models, lokrs["full"])
    first.set_multiplier(0.7)
    first.merge_into_models()  # the LoKr helper's in-RAM bake, then the second adapter live
    second = attach_lokr_from_file(models, lokrs["decomposed"])
    second.set_multiplier(1.3)
    _assert_close(baked, _outputs(models, x))
