"""LoKr baking on the tiny SDXL, checked against the test's own DESIGN.md §4 formula."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from test_merge_support import assert_rounded_once, bits, lokr_module, oracle_delta, perturbed, read_all, write_lokr_file

from lokr_trainer.merge import EMBEDDING_KEYS, bake_lokr, merge
from lokr_trainer.safetensors_io import read_header
from lokr_trainer.sdxl.keys import PREFIXES

U, T1, T2 = PREFIXES["unet"], PREFIXES["text_encoder"], PREFIXES["text_encoder_2"]

#: LoKr module -> (weight key, q/k/v index, how its factors are stored): every kind of target.
MODULES = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", None, "full"),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", None, "both_lowrank"),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj": (U + "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight", None, "w2_lowrank"),
    "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2": (U + "middle_block.1.transformer_blocks.0.ff.net.2.weight", None, "full"),
    "lora_unet_input_blocks_4_1_proj_in": (U + "input_blocks.4.1.proj_in.weight", None, "full"),
    "lora_unet_input_blocks_1_0_in_layers_2": (U + "input_blocks.1.0.in_layers.2.weight", None, "full"),  # 3x3 conv, 4-D w2
    "lora_unet_input_blocks_4_0_out_layers_3": (U + "input_blocks.4.0.out_layers.3.weight", None, "w2_lowrank"),  # flattened w2_b
    "lora_unet_output_blocks_0_0_in_layers_2": (U + "output_blocks.0.0.in_layers.2.weight", None, "tucker"),
    "lora_unet_input_blocks_4_0_skip_connection": (U + "input_blocks.4.0.skip_connection.weight", None, "full"),  # 1x1 conv
    "lora_unet_input_blocks_4_0_emb_layers_1": (U + "input_blocks.4.0.emb_layers.1.weight", None, "full"),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (T1 + "text_model.encoder.layers.0.self_attn.q_proj.weight", None, "full"),
    "lora_te1_text_model_encoder_layers_1_mlp_fc1": (T1 + "text_model.encoder.layers.1.mlp.fc1.weight", None, "w2_lowrank"),
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (T2 + "transformer.resblocks.0.attn.in_proj_weight", 0, "full"),
    "lora_te2_text_model_encoder_layers_0_self_attn_k_proj": (T2 + "transformer.resblocks.0.attn.in_proj_weight", 1, "w2_lowrank"),
    "lora_te2_text_model_encoder_layers_0_self_attn_v_proj": (T2 + "transformer.resblocks.0.attn.in_proj_weight", 2, "full"),
    "lora_te2_text_model_encoder_layers_0_self_attn_out_proj": (T2 + "transformer.resblocks.0.attn.out_proj.weight", None, "full"),
    "lora_te2_text_model_encoder_layers_1_mlp_fc1": (T2 + "transformer.resblocks.1.mlp.c_fc.weight", None, "both_lowrank"),
}


def _slice_shape(shape, qkv):
    return shape if qkv is None else (shape[0] // 3, *shape[1:])


def _make_lokr(path, base_header, names, seed, mode_override=None, dtype=torch.float32, alpha=4.0):
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name in names:
        key, qkv, mode = MODULES[name]
        shape = _slice_shape(base_header.tensors[key].shape, qkv)
        mods[name] = lokr_module(shape, g, mode=mode_override or mode, alpha=alpha, dtype=dtype)
    write_lokr_file(path, mods)
    return mods


def _oracle(base, lokrs):
    """fp32 W + Σ m·ΔW per touched key, ΔW from the test's own formula, in file then q/k/v order."""
    acc = {}
    for mods, m in lokrs:
        for name, t in mods.items():
            key, qkv, _ = MODULES[name]
            w = acc.setdefault(key, base[key].float().clone())
            if qkv is None:
                acc[key] = w + m * oracle_delta(t, tuple(w.shape)).float()
            else:
                r = w.shape[0] // 3
                w[qkv * r : (qkv + 1) * r] = w[qkv * r : (qkv + 1) * r] + m * oracle_delta(t, (r, w.shape[1])).float()
    return acc


@pytest.fixture(scope="module")
def inputs(tiny_sdxl, tmp_path_factory):
    d = tmp_path_factory.mktemp("merge_bake")
    a16 = perturbed(tiny_sdxl.single_file, d / "a16.safetensors", seed=11, scale=0.0, dtype=torch.float16)
    b = perturbed(tiny_sdxl.single_file, d / "b.safetensors", seed=12)
    header = read_header(tiny_sdxl.single_file)
    names = list(MODULES)
    l1 = d / "l1.safetensors"
    l2 = d / "l2.safetensors"
    m1 = _make_lokr(l1, header, names, seed=1)
    # a second adapter on an overlapping set (same UNet module, TE2 k only, TE1 fc1), stored in fp16
    m2 = _make_lokr(l2, header, names[:3] + [names[11], names[13]], seed=2, dtype=torch.float16)
    return SimpleNamespace(dir=d, a=tiny_sdxl.single_file, a16=a16, b=b, folder=tiny_sdxl.diffusers_dir,
                           header=header, l1=l1, l2=l2, m1=m1, m2=m2)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_bake_every_kind_of_module(inputs, tmp_path, dtype):
    out = tmp_path / "baked.safetensors"
    res = bake_lokr(inputs.a16, [f"{inputs.l1}:0.5"], out, dtype=dtype, progress=False)
    got, meta = read_all(out)
    base, _ = read_all(inputs.a16)
    want = _oracle(base, [(inputs.m1, 0.5)])
    assert set(got) == set(base)
    assert len(want) == 15  # 17 modules, q/k/v share one key
    for k, t in got.items():
        if k in want:
            assert_rounded_once(t, want[k], what=k)
        elif dtype == "fp16" or not t.is_floating_point() or k.endswith("logit_scale"):
            assert torch.equal(bits(t), bits(base[k])), k  # untouched: the base's bytes
        else:
            assert torch.equal(bits(t), bits(base[k].float())), k  # untouched, cast exactly to fp32
    applied = res.lokr_counts[0].applied
    assert applied == {"unet": 10, "text_encoder": 2, "text_encoder_2": 5}
    assert res.components["unet"].baked == 10 and res.components["text_encoder_2"].baked == 3
    assert res.components["unet"].verbatim == (418 if dtype == "fp16" else 0)
    rec = json.loads(meta["lokr_trainer.merge"])
    assert rec["lokrs"] == [{"name": "l1.safetensors", "bytes": inputs.l1.stat().st_size, "multiplier": 0.5,
                             "modules_applied": 17}]
    assert rec["operations"] == ["bake_lokr"]


def test_full_matrix_deltas_are_bit_exact(inputs, tmp_path):
    """Full factors, s = 1: ΔW is products of two numbers, so W + m·ΔW is exact fp32 arithmetic."""
    names = [n for n, (_, _, mode) in MODULES.items() if mode == "full"]
    path = tmp_path / "full.safetensors"
    mods = _make_lokr(path, inputs.header, names, seed=5, alpha=1e5)  # alpha is ignored with both factors full
    for m in (1.0, 0.5):
        out = tmp_path / f"full_{m}.safetensors"
        bake_lokr(inputs.a, [(path, m)], out, dtype="fp32", progress=False)
        got, _ = read_all(out)
        base, _ = read_all(inputs.a)
        for name, t in mods.items():
            key, qkv, _ = MODULES[name]
            w1, w2 = t["lokr_w1"], t["lokr_w2"]
            if w2.dim() == 4:
                w1 = w1[:, :, None, None]
            w = base[key].clone()
            rows = slice(None) if qkv is None else slice(qkv * w.shape[0] // 3, (qkv + 1) * w.shape[0] // 3)
            w[rows] = w[rows] + m * torch.kron(w1, w2).reshape(w[rows].shape)
            assert torch.equal(bits(got[key][rows]), bits(w[rows])), (name, m)


def test_te2_qkv_deltas_land_in_their_rows(inputs, tmp_path):
    path = tmp_path / "k_only.safetensors"
    mods = _make_lokr(path, inputs.header, ["lora_te2_text_model_encoder_layers_0_self_attn_k_proj"], seed=7)
    out = tmp_path / "k.safetensors"
    bake_lokr(inputs.a16, [path], out, dtype="fp16", progress=False)
    got, _ = read_all(out)
    base, _ = read_all(inputs.a16)
    key = T2 + "transformer.resblocks.0.attn.in_proj_weight"
    r = base[key].shape[0] // 3
    assert torch.equal(bits(got[key][:r]), bits(base[key][:r]))  # q rows untouched
    assert torch.equal(bits(got[key][2 * r :]), bits(base[key][2 * r :]))  # v rows untouched
    assert not torch.equal(got[key][r : 2 * r], base[key][r : 2 * r])
    delta = oracle_delta(mods["lora_te2_text_model_encoder_layers_0_self_attn_k_proj"], (r, base[key].shape[1]))
    assert_rounded_once(got[key][r : 2 * r], base[key][r : 2 * r].float() + delta.float(), what="k rows")


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_weighted_sum_restore_and_two_lokrs_in_one_pass(inputs, tmp_path, dtype):
    out = tmp_path / "all.safetensors"
    res = merge(out, [inputs.a, inputs.b], weights=[0.6, 0.4], restore_embeddings=inputs.a16,
                lokrs=[f"{inputs.l1}:0.8", f"{inputs.l2}:-0.5"], dtype=dtype, progress=False)
    got, meta = read_all(out)
    A, _ = read_all(inputs.a)
    B, _ = read_all(inputs.b)
    R, _ = read_all(inputs.a16)
    summed = {k: A[k].float() * 0.6 + B[k].float() * 0.4 for k in A if A[k].is_floating_point()}
    want = _oracle(summed, [(inputs.m1, 0.8), (inputs.m2, -0.5)])
    out_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    for k, t in got.items():
        if k in want:
            assert_rounded_once(t, want[k], what=k)
        elif k.endswith(("position_ids", "logit_scale")):
            assert torch.equal(bits(t), bits(A[k])), k
        elif k in EMBEDDING_KEYS:
            # restored bit-exact: cast to the output dtype when that is lossless (fp16 -> fp32), else kept as fp16
            assert t.dtype == (torch.float16 if dtype != "fp32" else torch.float32), k
            assert torch.equal(bits(t.to(R[k].dtype)), bits(R[k])), k
        else:
            assert torch.equal(bits(t), bits(summed[k].to(out_dtype))), k
    assert res.operations == ["weighted_sum", "restore_embeddings", "bake_lokr"]
    assert [c.modules for c in res.lokr_counts] == [17, 5]
    rec = json.loads(meta["lokr_trainer.merge"])
    assert [l["multiplier"] for l in rec["lokrs"]] == [0.8, -0.5]


def test_diffusers_folder_base_bakes_like_its_single_file(inputs, tmp_path):
    bake_lokr(inputs.a, [inputs.l1], tmp_path / "file.safetensors", dtype="fp32", progress=False)
    bake_lokr(inputs.folder, [inputs.l1], tmp_path / "folder.safetensors", dtype="fp32", progress=False)
    x, _ = read_all(tmp_path / "file.safetensors")
    y, _ = read_all(tmp_path / "folder.safetensors")
    assert set(x) == set(y) and all(torch.equal(bits(x[k]), bits(y[k])) for k in x)


def test_diffusers_spelling_and_dora(inputs, tmp_path):
    """Modules named with diffusers UNet paths are read; a DoRA module is baked with LyCORIS' rescale."""
    g = torch.Generator().manual_seed(9)
    base, _ = read_all(inputs.a)
    k_q = U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    k_o = U + "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0.weight"
    q = lokr_module(base[k_q].shape, g, mode="full")
    o = lokr_module(base[k_o].shape, g, mode="full")
    o["dora_scale"] = (base[k_o].float().norm(dim=1, keepdim=True) * 1.1)  # per output row, (out, 1)
    path = write_lokr_file(tmp_path / "diffusers_names.safetensors", {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": q,
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0": o,
    })
    out = tmp_path / "d.safetensors"
    bake_lokr(inputs.a, [(path, 0.7)], out, dtype="fp32", progress=False)
    got, _ = read_all(out)
    assert_rounded_once(got[k_q], base[k_q] + 0.7 * oracle_delta(q, tuple(base[k_q].shape)).float(), what="to_q")
    merged = base[k_o].double() + oracle_delta(o, tuple(base[k_o].shape))
    factor = o["dora_scale"].double() / (merged.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps)
    assert_rounded_once(got[k_o], merged * (0.7 * (factor - 1) + 1), tol=1e-5, what="DoRA to_out")
