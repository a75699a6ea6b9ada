"""LoKr file format: ΔW formula, reading other tools' files, exact round trips."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lokr_trainer.errors import CorruptFileError, ShapeMismatchError
from lokr_trainer.lokr.io import LoKrModuleWeights, load_lokr, write_lokr
from lokr_trainer.safetensors_io import read_header

Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_input_blocks_4_0_in_layers_2"
TE = "lora_te1_text_model_encoder_layers_0_mlp_fc1"


def reference_delta(tensors: dict[str, torch.Tensor], weight_shape: tuple[int, ...]) -> torch.Tensor:
    """DESIGN.md §4 written out element-wise: ΔW[i·b+j, p·d+q, …] = s·W1[i,p]·W2[j,q,…]."""
    t = {k: v.double() for k, v in tensors.items()}
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    rank = None
    if "lokr_w1_b" in t:
        rank = t["lokr_w1_b"].shape[0]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:  # w2[p, r, …] = Σ t2[i, j, …] w2_a[i, p] w2_b[j, r]
        w2 = torch.einsum("ijhw,ip,jr->prhw", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        rank = t["lokr_w2_b"].shape[0]
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"].reshape(t["lokr_w2_b"].shape[0], -1)
        rank = t["lokr_w2_b"].shape[0]
    s = float(t["alpha"]) / rank if (rank is not None and "alpha" in t) else 1.0
    out, cin, *k = weight_shape
    a, c = w1.shape
    b, d = out // a, cin // c
    w2 = w2.reshape(b, d, *k)  # W2 carries the kernel dims
    delta = torch.einsum("ip,jq...->ijpq...", w1, w2).reshape(out, cin, *k)
    return (s * delta).float()


def _random_module(kind: str, g: torch.Generator) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if kind == "linear_full":  # 640x640, f=8, full matrix
        return {"lokr_w1": r(8, 8), "lokr_w2": r(80, 80), "alpha": torch.tensor(100000.0)}, (640, 640)
    if kind == "linear_lowrank":  # w2 decomposed, rank 4, alpha 2 -> s = 0.5
        return {"lokr_w1": r(8, 8), "lokr_w2_a": r(80, 4), "lokr_w2_b": r(4, 80), "alpha": torch.tensor(2.0)}, (640, 640)
    if kind == "linear_both":  # both decomposed, rank 2 (w2's rank counts)
        return {
            "lokr_w1_a": r(8, 2),
            "lokr_w1_b": r(2, 8),
            "lokr_w2_a": r(40, 2),
            "lokr_w2_b": r(2, 160),
            "alpha": torch.tensor(1.0),
        }, (320, 1280)
    if kind == "conv_full":
        return {"lokr_w1": r(4, 4), "lokr_w2": r(8, 8, 3, 3), "alpha": torch.tensor(1.0)}, (32, 32, 3, 3)
    if kind == "conv_lowrank":  # LyCORIS stores w2_b flattened to 2-D
        return {"lokr_w1": r(4, 4), "lokr_w2_a": r(8, 3), "lokr_w2_b": r(3, 8 * 9), "alpha": torch.tensor(6.0)}, (
            32,
            32,
            3,
            3,
        )
    if kind == "conv_tucker":  # w2_a stored (r, out_k)
        return {
            "lokr_w1": r(4, 4),
            "lokr_w2_a": r(3, 8),
            "lokr_w2_b": r(3, 8),
            "lokr_t2": r(3, 3, 3, 3),
            "alpha": torch.tensor(1.5),
        }, (32, 32, 3, 3)
    if kind == "conv_unbalanced":  # out and in split by different factors (not a LyCORIS layout; UIs read it)
        return {"lokr_w1": r(2, 4), "lokr_w2": r(16, 8, 3, 3), "alpha": torch.tensor(1.0)}, (32, 32, 3, 3)
    if kind == "conv1x1_full":
        return {"lokr_w1": r(4, 4), "lokr_w2": r(8, 16, 1, 1), "alpha": torch.tensor(1.0)}, (32, 64, 1, 1)
    raise AssertionError(kind)


KINDS = [
    "linear_full",
    "linear_lowrank",
    "linear_both",
    "conv_full",
    "conv_lowrank",
    "conv_tucker",
    "conv_unbalanced",
    "conv1x1_full",
]


@pytest.mark.parametrize("kind", KINDS)
def test_delta_weight_is_the_design_formula(kind):
    tensors, shape = _random_module(kind, torch.Generator().manual_seed(KINDS.index(kind)))
    got = LoKrModuleWeights("m", tensors).delta_weight(shape)
    assert got.dtype == torch.float32 and tuple(got.shape) == shape
    ref = reference_delta(tensors, shape)
    assert (got - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max())


def test_scale_is_applied_once_and_full_matrix_ignores_alpha():
    g = torch.Generator().manual_seed(1)
    tensors, shape = _random_module("linear_lowrank", g)
    m = LoKrModuleWeights("m", tensors)
    assert m.rank == 4 and m.scale == 0.5
    plain = torch.kron(tensors["lokr_w1"], tensors["lokr_w2_a"] @ tensors["lokr_w2_b"])
    assert torch.allclose(m.delta_weight(shape), 0.5 * plain, atol=1e-5)
    full = LoKrModuleWeights("m", _random_module("linear_full", g)[0])
    assert full.rank is None and full.scale == 1.0


@pytest.mark.parametrize("kind", ["linear_lowrank", "linear_both", "conv_full", "conv_lowrank", "linear_full"])
def test_lycoris_forward_agrees_with_our_delta(kind):
    """lycoris' own module, built from the file tensors, computes base(x) + x·ΔWᵀ with our ΔW."""
    from lycoris.modules.lokr import LokrModule

    g = torch.Generator().manual_seed(7)
    tensors, shape = _random_module(kind, g)
    if len(shape) == 2:
        base = torch.nn.Linear(shape[1], shape[0])
        x = torch.randn(3, shape[1], generator=g)
    else:
        base = torch.nn.Conv2d(shape[1], shape[0], shape[2], padding=shape[2] // 2)
        x = torch.randn(2, shape[1], 6, 6, generator=g)
    w = [tensors.get(k) for k in LokrModule.weight_list]
    with torch.no_grad():
        lyco = LokrModule.make_module_from_state_dict("m", base, *w)
        got = lyco(x)
        delta = LoKrModuleWeights("m", tensors).delta_weight(shape)
        if len(shape) == 2:
            want = F.linear(x, base.weight + delta, base.bias)
        else:
            want = F.conv2d(x, base.weight + delta, base.bias, padding=shape[2] // 2)
    assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max())


def test_delta_weight_refuses_a_weight_it_does_not_fit():
    tensors, _ = _random_module("linear_full", torch.Generator().manual_seed(0))
    with pytest.raises(ShapeMismatchError, match="m"):
        LoKrModuleWeights("m", tensors).delta_weight((640, 1280))


def test_dora_apply_matches_lycoris_weight_decompose():
    from lycoris.functional.general import weight_decompose

    g = torch.Generator().manual_seed(3)
    tensors, shape = _random_module("linear_lowrank", g)
    w = torch.randn(shape, generator=g)
    tensors["dora_scale"] = w.norm(dim=1, keepdim=True) * 1.3
    m = LoKrModuleWeights("m", tensors)
    for mult in (1.0, 0.5):
        want = weight_decompose(w + m.delta_weight(shape), tensors["dora_scale"], mult, True)
        assert torch.allclose(m.apply_to_weight(w, mult), want, atol=1e-5)
    plain = LoKrModuleWeights("m", {k: v for k, v in tensors.items() if k != "dora_scale"})
    assert torch.allclose(plain.apply_to_weight(w, 0.5), w + 0.5 * plain.delta_weight(shape))


def _tensors_and_meta(path):
    return load_file(str(path)), read_header(path).metadata


def test_write_then_load_then_write_is_byte_identical(tmp_path):
    g = torch.Generator().manual_seed(5)
    mods = {
        Q: {k: v.half() if k != "alpha" else v for k, v in _random_module("linear_full", g)[0].items()},
        CONV: {k: v.half() if k != "alpha" else v for k, v in _random_module("conv_lowrank", g)[0].items()},
    }
    meta = {"ss_network_module": "lycoris.kohya", "modelspec.title": "t"}
    p1 = write_lokr(tmp_path / "a.safetensors", mods, meta)
    f = load_lokr(p1)
    assert set(f.modules) == {Q, CONV} and f.metadata == meta
    p2 = f.save(tmp_path / "b.safetensors")
    assert p1.read_bytes() == p2.read_bytes()
    sd, _ = _tensors_and_meta(p1)
    # alpha 100000 stays finite: a 0-d float32 tensor in an fp16 file
    assert sd[f"{Q}.alpha"].dtype == torch.float32 and sd[f"{Q}.alpha"].shape == () and sd[f"{Q}.alpha"] == 100000.0
    assert sd[f"{Q}.lokr_w2"].dtype == torch.float16


def test_dtype_cast_on_write_keeps_alpha_fp32(tmp_path):
    tensors, _ = _random_module("linear_lowrank", torch.Generator().manual_seed(2))
    p = write_lokr(tmp_path / "x.safetensors", {Q: tensors}, {}, dtype=torch.bfloat16)
    sd = load_file(str(p))
    assert sd[f"{Q}.lokr_w1"].dtype == torch.bfloat16 and sd[f"{Q}.alpha"].dtype == torch.float32


def test_reads_lycoris_and_diffusers_spellings_normalised(tmp_path):
    g = torch.Generator().manual_seed(4)
    lin, _ = _random_module("linear_full", g)
    te, _ = _random_module("linear_lowrank", g)
    sd = {}
    # LyCORIS writes alpha in the weights' dtype; SimpleTuner/diffusers-path names; TE without text_model
    for k, v in lin.items():
        sd[f"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.{k}"] = v.half()
    for k, v in te.items():
        sd[f"lora_te1_encoder_layers_0_mlp_fc1.{k}"] = v.half()
    save_file(sd, str(tmp_path / "lyco.safetensors"), metadata={"ss_network_module": "lycoris.kohya"})
    f = load_lokr(tmp_path / "lyco.safetensors")
    assert set(f.modules) == {Q, TE}
    assert f.modules[Q].tensors["lokr_w2"].dtype == torch.float16
    assert f.metadata == {"ss_network_module": "lycoris.kohya"}


def test_same_module_under_two_spellings_is_an_error(tmp_path):
    lin, _ = _random_module("linear_full", torch.Generator().manual_seed(4))
    sd = {f"{Q}.{k}": v for k, v in lin.items()}
    sd.update({f"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.{k}": v.clone() for k, v in lin.items()})
    save_file(sd, str(tmp_path / "dup.safetensors"))
    with pytest.raises(CorruptFileError, match="same module"):
        load_lokr(tmp_path / "dup.safetensors")


def test_unknown_or_foreign_modules_are_named_unless_skipped(tmp_path, caplog):
    lin, _ = _random_module("linear_full", torch.Generator().manual_seed(4))
    sd = {f"{Q}.{k}": v for k, v in lin.items()}
    sd.update({f"lora_unet_input_blocks_4_1_transformer_blocks_5_attn1_to_q.{k}": v.clone() for k, v in lin.items()})
    sd["lora_unet_input_blocks_4_1_proj_in.lora_up.weight"] = torch.zeros(640, 4)
    sd["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"] = torch.zeros(4, 640)
    save_file(sd, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(CorruptFileError) as e:
        load_lokr(tmp_path / "mixed.safetensors")
    assert "transformer_blocks_5_attn1_to_q" in str(e.value) and "proj_in" in str(e.value)
    f = load_lokr(tmp_path / "mixed.safetensors", skip_unknown=True)
    assert set(f.modules) == {Q}
    assert "skipping" in caplog.text


@pytest.mark.parametrize(
    "tensors",
    [
        {"lokr_w1": torch.zeros(2, 2), "alpha": torch.tensor(1.0)},  # no w2
        {"lokr_w1": torch.zeros(2, 2), "lokr_w2_a": torch.zeros(4, 3), "lokr_w2_b": torch.zeros(2, 4)},  # rank 3 vs 2
        {"lokr_w1": torch.zeros(2, 2), "lokr_w2": torch.zeros(4, 4), "alpha": torch.zeros(2)},  # alpha not scalar
        {"lokr_w1": torch.zeros(2, 2), "lokr_w2": torch.zeros(4, 4), "lokr_t9": torch.zeros(1)},  # unknown tensor
    ],
)
def test_inconsistent_modules_are_corrupt_file_errors(tmp_path, tensors):
    save_file({f"{Q}.{k}": v for k, v in tensors.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CorruptFileError, match=Q):
        load_lokr(tmp_path / "bad.safetensors")


def test_write_is_atomic_on_failure(tmp_path):
    out = tmp_path / "o.safetensors"
    write_lokr(out, {Q: {"lokr_w1": torch.ones(2, 2), "lokr_w2": torch.ones(2, 2)}}, {})
    before = out.read_bytes()
    with pytest.raises(CorruptFileError):
        write_lokr(out, {Q: {"lokr_w1": torch.ones(2, 2), "bogus": torch.ones(1)}}, {})
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["o.safetensors"]
    assert math.isclose(float(load_file(str(out))[f"{Q}.lokr_w1"][0, 0]), 1.0)


def test_reading_adapters_imports_no_model_library():
    """The merge tool reads LoKr files through this package; it must stay free of diffusers/transformers."""
    import subprocess
    import sys

    code = (
        "import sys; from lokr_trainer.lokr import load_lokr, lokr_name_to_sdxl_key, LoKrModuleWeights; "
        "print(sorted(m for m in ('diffusers', 'transformers', 'lycoris') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"lokr_w1": torch.ones(2, 2), "lokr_w2_a": torch.ones(32, 0), "lokr_w2_b": torch.ones(0, 32)}, "zero-size factor"),
        ({"lokr_w1": torch.ones(2, 2), "lokr_w2": torch.ones(32, 32), "dora_scale": torch.ones(3, 7)}, "dora_scale has shape"),
        ({"lokr_w1": torch.ones(2, 2, dtype=torch.int32), "lokr_w2": torch.ones(32, 32)}, "int32; LoKr tensors are floating point"),
    ],
)
def test_malformed_lokr_modules_are_errors_naming_the_module(tmp_path, extra, message):
    from safetensors.torch import save_file

    from lokr_trainer.errors import CorruptFileError

    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.{k}": v for k, v in extra.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CorruptFileError, match=message) as e:
        load_lokr(tmp_path / "bad.safetensors")
    assert name in str(e.value)
