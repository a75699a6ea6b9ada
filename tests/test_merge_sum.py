"""Weighted sums and CLIP embedding restore on the tiny SDXL, checked against the fp32 formula."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import pytest
import torch
from test_merge_support import bits, perturbed, read_all

from lokr_trainer.merge import EMBEDDING_KEYS, merge, restore_embeddings, weighted_sum
from lokr_trainer.sdxl.keys import PASSTHROUGH_KEYS, PREFIXES

POSITION_IDS = PREFIXES["text_encoder"] + "text_model.embeddings.position_ids"
LOGIT_SCALE = PREFIXES["text_encoder_2"] + "logit_scale"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture(scope="module")
def inputs(tiny_sdxl, tmp_path_factory):
    d = tmp_path_factory.mktemp("merge_sum")
    a = tiny_sdxl.single_file  # fp32
    return SimpleNamespace(
        dir=d,
        a=a,
        b=perturbed(a, d / "b.safetensors", seed=1),
        c=perturbed(a, d / "c16.safetensors", seed=2, dtype=torch.float16),
        ref16=perturbed(a, d / "ref16.safetensors", seed=3, dtype=torch.float16),
        folder=tiny_sdxl.diffusers_dir,
    )


def _is_summed(key: str, t: torch.Tensor) -> bool:
    return t.is_floating_point() and key not in PASSTHROUGH_KEYS


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_weighted_sum_of_three_equals_fp32_formula(inputs, tmp_path, dtype):
    out = tmp_path / "sum.safetensors"
    w = (0.25, 0.35, 0.4)
    res = weighted_sum([inputs.a, inputs.b, inputs.c], out, weights=w, dtype=dtype, progress=False)
    got, meta = read_all(out)
    A, _ = read_all(inputs.a)
    B, _ = read_all(inputs.b)
    C, _ = read_all(inputs.c)
    assert set(got) == set(A)  # output key set = base key set
    for k, t in got.items():
        if _is_summed(k, A[k]):
            want = (A[k].float() * w[0] + B[k].float() * w[1] + C[k].float() * w[2]).to(DTYPES[dtype])
            assert t.dtype == DTYPES[dtype] and torch.equal(bits(t), bits(want)), k
        else:  # position_ids (int64) and logit_scale: the first base's, verbatim, whatever the dtype
            assert t.dtype == A[k].dtype and torch.equal(bits(t), bits(A[k])), k
    assert got[POSITION_IDS].dtype == torch.int64 and torch.equal(got[POSITION_IDS], torch.arange(77)[None])
    counts = {c: (cc.keys, cc.summed, cc.verbatim) for c, cc in res.components.items()}
    assert counts["unet"] == (428, 428, 0) and counts["vae"] == (156, 156, 0)
    assert counts["text_encoder"] == (53, 52, 1) and counts["text_encoder_2"] == (42, 41, 1)
    recipe = json.loads(meta["lokr_trainer.merge"])
    assert [b["weight"] for b in recipe["bases"]] == list(w) and recipe["dtype"] == dtype
    assert [b["name"] for b in recipe["bases"]] == ["tiny_sdxl.safetensors", "b.safetensors", "c16.safetensors"]
    assert [b["bytes"] for b in recipe["bases"]] == [p.stat().st_size for p in (inputs.a, inputs.b, inputs.c)]
    assert recipe["operations"] == ["weighted_sum"] and "sha256" not in meta["lokr_trainer.merge"]
    assert not res.warnings


def test_default_weights_average_and_a_warning_when_weights_do_not_sum_to_one(inputs, tmp_path):
    avg = weighted_sum([inputs.a, inputs.b], tmp_path / "avg.safetensors", dtype="fp32", progress=False)
    got, _ = read_all(tmp_path / "avg.safetensors")
    A, _ = read_all(inputs.a)
    B, _ = read_all(inputs.b)
    k = PREFIXES["unet"] + "out.2.weight"
    assert torch.equal(got[k], A[k] * 0.5 + B[k] * 0.5)
    assert not avg.warnings
    res = weighted_sum([inputs.a, inputs.b], tmp_path / "scaled.safetensors", weights=[0.7, 0.7], progress=False)
    assert any("sum to 1.4" in w for w in res.warnings)


def test_diffusers_folder_base_and_embedding_restore(inputs, tmp_path):
    """A folder base sums like its single file; restored embeddings are the reference's bits."""
    out = tmp_path / "r.safetensors"
    res = merge(out, [inputs.folder, inputs.b], weights=[0.5, 0.5], restore_embeddings=inputs.ref16, dtype="fp16",
                progress=False)
    got, _ = read_all(out)
    A, _ = read_all(inputs.a)
    B, _ = read_all(inputs.b)
    R, _ = read_all(inputs.ref16)
    assert set(got) == set(A)
    for k in EMBEDDING_KEYS:
        assert got[k].dtype == torch.float16 and torch.equal(bits(got[k]), bits(R[k])), k
    for k, t in got.items():
        if k in EMBEDDING_KEYS:
            continue
        if _is_summed(k, A[k]):
            assert torch.equal(bits(t), bits((A[k].float() * 0.5 + B[k].float() * 0.5).to(torch.float16))), k
        else:
            assert torch.equal(bits(t), bits(A[k])), k
    assert res.components["text_encoder"].restored == 2 and res.components["text_encoder_2"].restored == 2
    assert res.operations == ["weighted_sum", "restore_embeddings"]


def test_restore_from_an_fp32_reference_keeps_its_bits(inputs, tmp_path):
    out = tmp_path / "r32.safetensors"
    res = restore_embeddings(inputs.c, inputs.b, out, dtype="fp16", progress=False)
    got, _ = read_all(out)
    B, _ = read_all(inputs.b)
    C, _ = read_all(inputs.c)
    for k in EMBEDDING_KEYS:  # fp32 -> fp16 would change them: they stay fp32, bit-identical
        assert got[k].dtype == torch.float32 and torch.equal(bits(got[k]), bits(B[k])), k
    for k, t in got.items():  # nothing else is touched: the fp16 base, byte for byte
        if k not in EMBEDDING_KEYS:
            assert torch.equal(bits(t), bits(C[k])), k
    assert "keep the reference's torch.float32" in res.report


def test_no_operation_is_a_verbatim_copy_or_one_cast(inputs, tmp_path):
    same = merge(tmp_path / "same.safetensors", [inputs.c], dtype="fp16", progress=False)
    got, _ = read_all(tmp_path / "same.safetensors")
    C, _ = read_all(inputs.c)
    assert set(got) == set(C) and all(torch.equal(bits(got[k]), bits(C[k])) for k in C)
    assert sum(cc.verbatim for cc in same.components.values()) == len(C)
    cast = merge(tmp_path / "cast.safetensors", [inputs.a], dtype="bf16", progress=False)
    got, _ = read_all(tmp_path / "cast.safetensors")
    A, _ = read_all(inputs.a)
    for k, t in got.items():
        want = A[k].to(torch.bfloat16) if _is_summed(k, A[k]) else A[k]
        assert torch.equal(bits(t), bits(want)), k
    assert sum(cc.cast for cc in cast.components.values()) == len(A) - 2


def test_metadata_modelspec_and_opt_in_hashes(inputs, tmp_path):
    out = tmp_path / "h.safetensors"
    merge(out, [inputs.b, inputs.folder], weights=[0.5, 0.5], hash_inputs=True, title="My merge",
          metadata={"author": "me"}, progress=False)
    _, meta = read_all(out)
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.title"] == "My merge" and meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.resolution"] == "64x64"  # carried from the first base (the tiny fixture says so)
    assert meta["modelspec.date"] and meta["author"] == "me" and meta["lokr_trainer.version"]
    rec = json.loads(meta["lokr_trainer.merge"])
    assert rec["bases"][0]["sha256"] == hashlib.sha256(inputs.b.read_bytes()).hexdigest()
    folder = rec["bases"][1]
    assert folder["format"] == "diffusers" and set(folder["sha256"]) == {
        "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors", "vae/diffusion_pytorch_model.safetensors",
    }
    f = inputs.folder / "vae" / "diffusion_pytorch_model.safetensors"
    assert folder["sha256"]["vae/diffusion_pytorch_model.safetensors"] == hashlib.sha256(f.read_bytes()).hexdigest()


@pytest.mark.parametrize("how", ["sum+restore", "restore", "copy"])
def test_the_key_accounting_adds_up(inputs, tmp_path, how):
    """Every key is counted once, in summed, restored or copied; the report's rows say the same."""
    out = tmp_path / f"{how}.safetensors"
    if how == "sum+restore":
        res = merge(out, [inputs.a, inputs.b], weights=[0.5, 0.5], restore_embeddings=inputs.ref16, progress=False)
    elif how == "restore":
        res = restore_embeddings(inputs.c, inputs.b, out, dtype="fp16", progress=False)
    else:
        res = merge(out, [inputs.c], dtype="fp16", progress=False)
    got, _ = read_all(out)
    assert sum(cc.keys for cc in res.components.values()) == len(got)
    for comp, cc in res.components.items():
        assert cc.summed + cc.restored + cc.copied == cc.keys, comp
    assert sum(cc.restored for cc in res.components.values()) == (0 if how == "copy" else len(EMBEDDING_KEYS))
    rows = [line.split() for line in res.report.splitlines() if line.split()[:1] in (["UNet"], ["TE1"], ["TE2"], ["VAE"], ["all"])]
    assert rows[-1][0] == "all" and int(rows[-1][1]) == len(got)
    for row in rows:
        total, summed, restored, copied = map(int, row[1:5])
        assert summed + restored + copied == total, row
