"""Loading and saving SDXL checkpoints: exact round trips, both layouts, clear errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lokr_trainer.errors import (
    CorruptFileError,
    LokrTrainerError,
    MissingComponentError,
    UnsafeFormatError,
    WrongModelError,
)
from lokr_trainer.sdxl import load_sdxl, save_sdxl
from lokr_trainer.sdxl.keys import COMPONENTS, PASSTHROUGH_KEYS, PREFIXES


def read_all(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)), k


def unet_output(models, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = models.unet.config
    sample = torch.randn(2, cfg.in_channels, 16, 16, generator=g)
    ctx = torch.randn(2, 7, cfg.cross_attention_dim, generator=g)
    pooled = torch.randn(2, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim, generator=g)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
    with torch.no_grad():
        return models.unet(
            sample, torch.tensor([10, 500]), ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_single_file_round_trip_is_bit_exact(tiny_sdxl, tmp_path, dtype):
    src = tiny_sdxl.single_file
    if dtype == torch.float16:  # a UI-like fp16 file made from the fixture
        src = save_sdxl(load_sdxl(tiny_sdxl.single_file), tmp_path / "fp16.safetensors", dtype=torch.float16)
    original = read_all(src)
    assert {t.dtype for k, t in original.items() if k not in PASSTHROUGH_KEYS} == {dtype}
    models = load_sdxl(src)  # fp32 in memory
    out = save_sdxl(models, tmp_path / "again.safetensors", dtype=dtype)
    assert_same_bytes(original, read_all(out))
    kept = load_sdxl(src, dtype=None)  # keep the file's dtype
    assert next(kept.unet.parameters()).dtype == dtype
    assert_same_bytes(original, read_all(save_sdxl(kept, tmp_path / "kept.safetensors", dtype=None)))


def test_fixture_has_real_sdxl_names_and_passthrough_tensors(tiny_sdxl):
    tensors = read_all(tiny_sdxl.single_file)
    for comp, prefix in PREFIXES.items():
        assert any(k.startswith(prefix) for k in tensors), comp
    pos = tensors[PREFIXES["text_encoder"] + "text_model.embeddings.position_ids"]
    assert pos.dtype == torch.int64 and pos.tolist() == [list(range(77))]
    assert PREFIXES["text_encoder_2"] + "transformer.resblocks.0.attn.in_proj_weight" in tensors
    assert tensors[PREFIXES["text_encoder_2"] + "logit_scale"].dtype == torch.float16


def test_fixture_is_deterministic(tmp_path):
    from lokr_trainer.testing import make_tiny_sdxl

    a = make_tiny_sdxl(tmp_path / "a", seed=3)
    b = make_tiny_sdxl(tmp_path / "b", seed=3)
    c = make_tiny_sdxl(tmp_path / "c", seed=4)
    assert a.single_file.read_bytes() == b.single_file.read_bytes()
    assert a.single_file.read_bytes() != c.single_file.read_bytes()
    files_a = sorted(p.relative_to(a.diffusers_dir) for p in a.diffusers_dir.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.diffusers_dir) for p in b.diffusers_dir.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a.diffusers_dir / rel).read_bytes() == (b.diffusers_dir / rel).read_bytes(), rel


def test_single_file_and_diffusers_folder_load_identically(tiny_sdxl):
    single = load_sdxl(tiny_sdxl.single_file)
    folder = load_sdxl(tiny_sdxl.diffusers_dir)
    for comp in COMPONENTS:
        a = getattr(single, comp).state_dict()
        b = getattr(folder, comp).state_dict()
        assert set(a) == set(b), comp
        for k in a:
            assert torch.equal(a[k], b[k]), f"{comp}.{k}"
    assert torch.equal(unet_output(single), unet_output(folder))
    assert single.scheduler_config["beta_schedule"] == folder.scheduler_config["beta_schedule"] == "scaled_linear"


def test_text_projection_is_transposed_like_openclip(tiny_sdxl):
    """The file's text_projection P is applied as x @ P; transformers' Linear as x @ W.T."""
    models = load_sdxl(tiny_sdxl.single_file)
    p = read_all(tiny_sdxl.single_file)[PREFIXES["text_encoder_2"] + "text_projection"]
    x = torch.randn(3, p.shape[0])
    with torch.no_grad():
        assert torch.allclose(models.text_encoder_2.text_projection(x), x @ p, atol=1e-6)


def test_diffusers_round_trip_to_single_file(tiny_sdxl, tmp_path):
    folder = load_sdxl(tiny_sdxl.diffusers_dir)
    out = save_sdxl(folder, tmp_path / "from_folder.safetensors", dtype=torch.float32)
    assert_same_bytes(read_all(tiny_sdxl.single_file), read_all(out))


def test_diffusers_folder_save_loads_back(tiny_models, tmp_path):
    out = save_sdxl(tiny_models, tmp_path / "folder", layout="diffusers", dtype=torch.float32)
    again = load_sdxl(out)
    for comp in COMPONENTS:
        for k, v in getattr(tiny_models, comp).state_dict().items():
            assert torch.equal(v, getattr(again, comp).state_dict()[k]), f"{comp}.{k}"


def test_device_and_dtype_arguments(tiny_sdxl):
    models = load_sdxl(tiny_sdxl.single_file, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in models.unet.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for comp in COMPONENTS for p in getattr(models, comp).parameters())


# --------------------------------------------------------------------------- bad input


def _rewrite(src: Path, dst: Path, transform) -> Path:
    tensors = transform(read_all(src))
    save_file(tensors, str(dst))
    return dst


def test_truncated_file_names_file_and_problem(tiny_sdxl, tmp_path):
    data = tiny_sdxl.single_file.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError) as e:
        load_sdxl(bad)
    assert "truncated.safetensors" in str(e.value) and "ends at byte" in str(e.value)


@pytest.mark.parametrize(
    "payload, needle",
    [
        (b"", "too short"),
        (b"\x00" * 4, "too short"),
        (struct.pack("<Q", 10**12) + b"{}", "header length"),
        (struct.pack("<Q", 4) + b"nope", "not valid JSON"),
        (b"PK\x03\x04" + b"\x00" * 100, "header length"),  # a zip (.ckpt) renamed .safetensors
    ],
)
def test_corrupt_headers(tmp_path, payload, needle):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(payload)
    with pytest.raises(CorruptFileError) as e:
        load_sdxl(bad)
    assert needle in str(e.value) and "bad.safetensors" in str(e.value)


def test_inconsistent_tensor_entry(tmp_path):
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 16)
    with pytest.raises(CorruptFileError, match="8 bytes stored"):
        load_sdxl(bad)


def test_sd15_checkpoint_is_refused(tmp_path):
    sd15 = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(768),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
    }
    save_file(sd15, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(WrongModelError, match="Stable Diffusion 1.x") as e:
        load_sdxl(tmp_path / "sd15.safetensors")
    assert "sd15.safetensors" in str(e.value)


def test_sd2_checkpoint_is_refused(tmp_path):
    sd2 = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "cond_stage_model.model.ln_final.weight": torch.zeros(1024),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
    }
    save_file(sd2, str(tmp_path / "sd2.safetensors"))
    with pytest.raises(WrongModelError, match="Stable Diffusion 2.x"):
        load_sdxl(tmp_path / "sd2.safetensors")


@pytest.mark.parametrize("component", COMPONENTS)
def test_missing_component_is_named(tiny_sdxl, tmp_path, component):
    dst = _rewrite(
        tiny_sdxl.single_file,
        tmp_path / f"no_{component}.safetensors",
        lambda t: {k: v for k, v in t.items() if not k.startswith(PREFIXES[component])},
    )
    with pytest.raises(MissingComponentError) as e:
        load_sdxl(dst)
    assert component in str(e.value) and dst.name in str(e.value)


def test_missing_single_tensor_is_named(tiny_sdxl, tmp_path):
    victim = PREFIXES["unet"] + "output_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    dst = _rewrite(tiny_sdxl.single_file, tmp_path / "hole.safetensors", lambda t: {k: v for k, v in t.items() if k != victim})
    with pytest.raises(CorruptFileError, match="missing") as e:
        load_sdxl(dst)
    assert "up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_k.weight" in str(e.value)


def test_wrong_shape_is_named(tiny_sdxl, tmp_path):
    victim = PREFIXES["vae"] + "decoder.conv_out.bias"

    def shrink(t):
        t[victim] = t[victim][:2].clone()
        return t

    dst = _rewrite(tiny_sdxl.single_file, tmp_path / "shape.safetensors", shrink)
    with pytest.raises(LokrTrainerError, match="decoder.conv_out"):
        load_sdxl(dst)


def test_missing_diffusers_subfolder(tiny_sdxl, tmp_path):
    import shutil

    folder = tmp_path / "partial"
    shutil.copytree(tiny_sdxl.diffusers_dir, folder)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(MissingComponentError, match="text_encoder_2"):
        load_sdxl(folder)


def test_pickle_checkpoint_needs_opt_in(tiny_sdxl, tmp_path):
    state = read_all(tiny_sdxl.single_file)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 7}, ckpt)
    with pytest.raises(UnsafeFormatError, match="allow_pickle") as e:
        load_sdxl(ckpt)
    assert "model.ckpt" in str(e.value)
    models = load_sdxl(ckpt, allow_pickle=True)
    reference = load_sdxl(tiny_sdxl.single_file)
    for k, v in reference.unet.state_dict().items():
        assert torch.equal(v, models.unet.state_dict()[k])


class _Payload:
    """Stands for an arbitrary object in a malicious pickle."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_loading_is_weights_only(tmp_path, capsys):
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Payload()}, ckpt)
    with pytest.raises(CorruptFileError, match="weights_only"):
        load_sdxl(ckpt, allow_pickle=True)
    assert "this must never run" not in capsys.readouterr().out


def test_missing_file(tmp_path):
    with pytest.raises(LokrTrainerError, match="not found"):
        load_sdxl(tmp_path / "nope.safetensors")


def test_save_is_atomic_on_failure(tiny_models, tmp_path, monkeypatch):
    """A failure while writing (e.g. a full disk) leaves neither output nor temp file."""
    import lokr_trainer.safetensors_io as sio

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sio.os, "fsync", boom)
    out = tmp_path / "out.safetensors"
    with pytest.raises(OSError, match="No space"):
        save_sdxl(tiny_models, out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["1d_label_emb", "no_input_resnets", "int_weight"])
def test_sdxl_shaped_files_that_are_not_sdxl_networks_are_clear_errors(tiny_sdxl, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    from lokr_trainer.errors import CorruptFileError

    t = load_file(str(tiny_sdxl.single_file))
    if damage == "1d_label_emb":
        t["model.diffusion_model.label_emb.0.0.weight"] = torch.ones(5)
        message = "do not form SDXL networks"
    elif damage == "no_input_resnets":
        t = {k: v for k, v in t.items() if ".input_blocks.1.0." not in k}
        message = "do not form SDXL networks"
    else:
        t["model.diffusion_model.out.2.weight"] = t["model.diffusion_model.out.2.weight"].to(torch.int32)
        message = "stored as integers: conv_out.weight"
    save_file(t, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CorruptFileError, match=message):
        load_sdxl(tmp_path / "bad.safetensors")
