"""Bad input stops the merge before anything is written, naming the file and the key."""

from __future__ import annotations

import errno
from types import SimpleNamespace

import pytest
import torch
from test_merge_support import files_in, lokr_module, read_all, write_file, write_lokr_file

from lokr_trainer.errors import (
    CheckpointError,
    ConfigError,
    CorruptFileError,
    NonFiniteResultError,
    ShapeMismatchError,
    UnmatchedModuleError,
    WrongModelError,
)
from lokr_trainer.merge import bake_lokr, merge, weighted_sum
from lokr_trainer.sdxl.keys import PREFIXES

U, T2 = PREFIXES["unet"], PREFIXES["text_encoder_2"]
TO_Q = U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"


@pytest.fixture(scope="module")
def base(tiny_sdxl, tmp_path_factory):
    d = tmp_path_factory.mktemp("merge_errors")
    tensors, meta = read_all(tiny_sdxl.single_file)
    return SimpleNamespace(dir=d, path=tiny_sdxl.single_file, tensors=tensors, meta=meta)


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def _nothing_written(out_dir):
    assert files_in(out_dir) == [], files_in(out_dir)  # no OUT, no temp file


def test_bases_with_different_keys(base, out_dir, tmp_path):
    t = dict(base.tensors)
    del t[TO_Q]
    t[U + "extra.weight"] = torch.zeros(2)
    other = write_file(tmp_path / "other.safetensors", t)
    with pytest.raises(CheckpointError) as e:
        weighted_sum([base.path, other], out_dir / "o.safetensors", progress=False)
    msg = str(e.value)
    assert str(other) in msg and TO_Q in msg and "extra.weight" in msg
    _nothing_written(out_dir)


def test_bases_with_different_shapes(base, out_dir, tmp_path):
    t = dict(base.tensors)
    t[TO_Q] = torch.zeros(64, 32)
    other = write_file(tmp_path / "other.safetensors", t)
    with pytest.raises(ShapeMismatchError) as e:
        weighted_sum([base.path, other], out_dir / "o.safetensors", progress=False)
    assert str(other) in str(e.value) and TO_Q in str(e.value) and "[64, 32]" in str(e.value)
    _nothing_written(out_dir)


def test_weights_count_and_bad_values(base, out_dir):
    with pytest.raises(ConfigError, match="3 weights for 2 bases"):
        weighted_sum([base.path, base.path], out_dir / "o.safetensors", weights=[0.3, 0.3, 0.4], progress=False)
    with pytest.raises(ConfigError, match="not finite"):
        weighted_sum([base.path, base.path], out_dir / "o.safetensors", weights=[0.5, float("nan")], progress=False)
    with pytest.raises(ConfigError, match="unknown output dtype"):
        merge(out_dir / "o.safetensors", [base.path], dtype="fp8", progress=False)
    _nothing_written(out_dir)


def test_not_sdxl(base, out_dir, tmp_path):
    sd15 = write_file(tmp_path / "sd15.safetensors", {"cond_stage_model.transformer.x": torch.zeros(2)})
    with pytest.raises(WrongModelError, match="not an SDXL checkpoint: this is Stable Diffusion 1.x"):
        merge(out_dir / "o.safetensors", [sd15], progress=False)  # the same rule and words as load_sdxl
    no_vae = write_file(tmp_path / "novae.safetensors", {k: v for k, v in base.tensors.items() if not k.startswith("first_stage")})
    with pytest.raises(CheckpointError, match=r"VAE \(first_stage_model"):
        merge(out_dir / "o.safetensors", [no_vae], progress=False)
    _nothing_written(out_dir)


def test_lokr_module_missing_from_base_stops_unless_skipped(base, out_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    mods = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": lokr_module((64, 64), g),
        # the tiny UNet has 2 transformer blocks there and TE2 2 layers: these do not exist
        "lora_unet_input_blocks_4_1_transformer_blocks_7_attn1_to_q": lokr_module((64, 64), g),
        "lora_te2_text_model_encoder_layers_5_mlp_fc1": lokr_module((64, 32), g),
    }
    lokr = write_lokr_file(tmp_path / "l.safetensors", mods)
    with pytest.raises(UnmatchedModuleError) as e:
        bake_lokr(base.path, [lokr], out_dir / "o.safetensors", progress=False)
    msg = str(e.value)
    assert str(lokr) in msg and "2 LoKr modules" in msg
    assert "transformer_blocks_7_attn1_to_q" in msg and "lora_te2_text_model_encoder_layers_5_mlp_fc1" in msg
    assert "TE2:" in msg and "--skip-unmatched" in msg
    _nothing_written(out_dir)

    res = bake_lokr(base.path, [lokr], out_dir / "o.safetensors", skip_unmatched=True, progress=False)
    assert any("skipping 2 modules" in w for w in res.warnings)
    count = res.lokr_counts[0]
    assert count.modules == 1 and count.applied == {"unet": 1}
    assert {c: len(v) for c, v in count.unmatched.items()} == {"unet": 1, "text_encoder_2": 1}
    assert "unmatched TE2: lora_te2_text_model_encoder_layers_5_mlp_fc1" in res.report
    assert files_in(out_dir) == ["o.safetensors"]


def test_non_lokr_modules_are_unmatched_and_a_pure_lora_file_is_named_as_one(base, out_dir, tmp_path):
    lora = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 4),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32),
    }
    pure = write_file(tmp_path / "lora.safetensors", lora)
    with pytest.raises(CheckpointError, match="is a LoRA"):
        bake_lokr(base.path, [pure], out_dir / "o.safetensors", progress=False)
    g = torch.Generator().manual_seed(0)
    mixed_modules = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": lokr_module((64, 64), g, mode="full")}
    mixed = write_lokr_file(tmp_path / "mixed.safetensors", mixed_modules)
    extra = read_all(mixed)[0]
    extra.update(lora)
    mixed = write_file(tmp_path / "mixed2.safetensors", extra)
    with pytest.raises(UnmatchedModuleError, match="not a LoKr module"):
        bake_lokr(base.path, [mixed], out_dir / "o.safetensors", progress=False)
    _nothing_written(out_dir)


def test_lokr_shape_mismatch(base, out_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    lokr = write_lokr_file(tmp_path / "l.safetensors", {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": lokr_module((128, 64), g),
    })
    with pytest.raises(ShapeMismatchError) as e:
        bake_lokr(base.path, [lokr], out_dir / "o.safetensors", skip_unmatched=True, progress=False)
    msg = str(e.value)
    assert str(lokr) in msg and "attn1_to_q" in msg and TO_Q in msg and "[64, 64]" in msg
    _nothing_written(out_dir)


def test_non_finite_result_leaves_nothing(base, out_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    mod = lokr_module((64, 64), g, mode="full")
    mod["lokr_w2"] = mod["lokr_w2"] * 0 + 1e4  # |ΔW| ~ 1e3 .. 1e4 x w1: overflows fp16 at multiplier 100
    lokr = write_lokr_file(tmp_path / "big.safetensors", {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": mod})
    with pytest.raises(NonFiniteResultError) as e:
        bake_lokr(base.path, [(lokr, 100.0)], out_dir / "o.safetensors", dtype="fp16", progress=False)
    msg = str(e.value)
    assert TO_Q in msg and "big.safetensors" in msg and "inf/nan" in msg and "bf16/fp32" in msg
    _nothing_written(out_dir)
    bake_lokr(base.path, [(lokr, 100.0)], out_dir / "o.safetensors", dtype="fp32", progress=False)  # fine in fp32


def test_existing_output_needs_overwrite_and_output_is_not_an_input(base, out_dir):
    out = out_dir / "o.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(CheckpointError, match="--overwrite"):
        merge(out, [base.path], progress=False)
    assert out.read_bytes() == b"keep me" and files_in(out_dir) == ["o.safetensors"]
    merge(out, [base.path], overwrite=True, progress=False)
    assert set(read_all(out)[0]) == set(base.tensors)
    with pytest.raises(CheckpointError, match="is also an input"):
        merge(out, [out], overwrite=True, progress=False)


@pytest.mark.parametrize("direct", [True, False])
def test_full_disk_while_writing_leaves_no_file(base, out_dir, monkeypatch, direct):
    """ENOSPC in the middle of the data: no OUT, no temp file, an existing OUT untouched."""
    from lokr_trainer.merge import stream

    monkeypatch.setattr(stream, "STAGING_BYTES", 256 << 10)  # ~90 writes for the tiny SDXL
    if not direct:
        monkeypatch.setattr(stream, "_enable_direct", lambda fd: False)
    real = stream._write_all
    calls = {"n": 0}

    def full_disk(fd, view):
        calls["n"] += 1
        if calls["n"] > 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, view)

    monkeypatch.setattr(stream, "_write_all", full_disk)
    with pytest.raises(OSError) as e:
        merge(out_dir / "o.safetensors", [base.path, base.path], weights=[0.5, 0.5], progress=False)
    assert e.value.errno == errno.ENOSPC and calls["n"] == 41
    _nothing_written(out_dir)
    old = out_dir / "old.safetensors"
    old.write_bytes(b"previous")
    calls["n"] = 0
    with pytest.raises(OSError):
        merge(old, [base.path], overwrite=True, progress=False)
    assert files_in(out_dir) == ["old.safetensors"] and old.read_bytes() == b"previous"


def test_corrupt_and_missing_inputs(base, out_dir, tmp_path):
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(base.path.read_bytes()[: 100_000])
    with pytest.raises(CorruptFileError, match="trunc.safetensors"):
        merge(out_dir / "o.safetensors", [bad], progress=False)
    with pytest.raises(CheckpointError, match="LoKr file not found"):
        bake_lokr(base.path, [tmp_path / "nope.safetensors"], out_dir / "o.safetensors", progress=False)
    with pytest.raises(CheckpointError, match="reference has no"):
        merge(out_dir / "o.safetensors", [base.path], restore_embeddings=write_file(tmp_path / "r.safetensors", {"x": torch.zeros(1)}),
              progress=False)
    _nothing_written(out_dir)


def _digest(folder):
    import hashlib
    from pathlib import Path

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("how", ["inside", "symlinked_folder", "hard_link", "restore_folder"])
def test_a_merge_never_writes_into_or_over_an_input_even_with_overwrite(base, tiny_sdxl, tmp_path, how):
    import os
    import shutil

    folder = tmp_path / "base_diffusers"
    shutil.copytree(tiny_sdxl.diffusers_dir, folder)
    before = _digest(folder)
    target = folder / "unet" / "diffusion_pytorch_model.safetensors"
    kwargs = {}
    if how == "inside":
        out, bases = target, [folder]
    elif how == "symlinked_folder":
        link = tmp_path / "link"
        link.symlink_to(folder)
        out, bases = link / "unet" / "diffusion_pytorch_model.safetensors", [folder]
    elif how == "hard_link":
        out = tmp_path / "elsewhere.safetensors"
        os.link(target, out)
        bases = [folder]
    else:  # output inside the --restore-embeddings folder
        out, bases = folder / "text_encoder" / "model.safetensors", [base.path]
        kwargs["restore_embeddings"] = folder
    with pytest.raises(CheckpointError, match="is also an input"):
        merge(out, bases, overwrite=True, progress=False, **kwargs)
    assert _digest(folder) == before  # not one byte of the input changed


def test_an_existing_output_that_is_an_input_says_so_first(base):
    with pytest.raises(CheckpointError, match="is also an input"):
        merge(base.path, [base.path], progress=False)  # no --overwrite: still the real reason first


def test_a_weight_map_pointing_outside_its_folder_is_refused(tiny_sdxl, tmp_path, out_dir):
    import json
    import shutil

    folder = tmp_path / "evil"
    shutil.copytree(tiny_sdxl.diffusers_dir, folder)
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(tmp_path / "outside.safetensors")
    keys = list(read_all(tmp_path / "outside.safetensors")[0])
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "../../outside.safetensors" for k in keys}})
    )
    with pytest.raises(CorruptFileError, match="outside its folder"):
        merge(out_dir / "o.safetensors", [folder], progress=False)
    _nothing_written(out_dir)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_a_nan_in_a_base_is_refused_even_when_copied_byte_for_byte(base, out_dir, tmp_path, dtype):
    t = {k: (v.to(torch.float16) if v.is_floating_point() else v) for k, v in base.tensors.items()}
    t[TO_Q] = t[TO_Q].clone()
    t[TO_Q].view(-1)[5] = float("nan")
    nan_base = write_file(tmp_path / "nan16.safetensors", t)
    with pytest.raises(NonFiniteResultError, match=r"attn1\.to_q\.weight holds .*inf/nan values already in its input.*damaged"):
        merge(out_dir / "o.safetensors", [nan_base], dtype=dtype, progress=False)  # fp16 -> fp16 is a plain copy
    _nothing_written(out_dir)


# ------------------------------------------------------------- a single base is checked against the reference

def _damaged(base, how):
    t = dict(base.tensors)
    if how == "missing_bias":
        del t[U + "out.2.bias"]
    elif how == "int_weight":
        t[TO_Q] = t[TO_Q].to(torch.int32)
    elif how == "bias_misfit":
        t[U + "out.2.bias"] = torch.zeros(t[U + "out.2.bias"].shape[0] + 1)
    elif how == "unknown_key":
        t[U + "input_blocks.4.1.transformer_blocks.0.attn1.to_z.weight"] = torch.zeros(2, 2)
    return t


@pytest.mark.parametrize("how,expect", [
    ("missing_bias", "out.2.bias"),
    ("int_weight", "not floating point"),
    ("bias_misfit", "does not fit"),
    ("unknown_key", "to_z.weight"),
])
def test_a_single_damaged_base_is_refused_as_load_sdxl_refuses_it(base, out_dir, tmp_path, how, expect):
    """A file load_sdxl rejects is never what the merge writes: the same damage stops both."""
    from lokr_trainer.sdxl import load_sdxl

    bad = write_file(tmp_path / f"{how}.safetensors", _damaged(base, how))
    with pytest.raises(CorruptFileError) as e:
        weighted_sum([bad], out_dir / "o.safetensors", progress=False)
    assert str(bad) in str(e.value) and expect in str(e.value)
    _nothing_written(out_dir)
    with pytest.raises(CheckpointError):
        load_sdxl(bad)


def test_the_reference_check_at_full_size():
    """At SDXL 1.0's size the key set and every shape must be the reference's (header only, no 7 GB file)."""
    from lokr_trainer.sdxl.reference import check_base_tensors, sdxl_base_keys

    ref = dict(sdxl_base_keys())
    check_base_tensors(ref, "ok.safetensors")  # the reference itself
    lenient = {k: v for k, v in ref.items() if not k.endswith(("position_ids", "logit_scale"))}
    vae_q = "first_stage_model.encoder.mid.attn_1.q.weight"
    lenient[vae_q] = (ref[vae_q][0][:2], ref[vae_q][1])  # 2-D VAE attention, as some converters write it
    check_base_tensors(lenient, "ok.safetensors")

    key = "model.diffusion_model.output_blocks.2.2.conv.weight"
    assert key in ref
    without = {k: v for k, v in ref.items() if k != key}
    with pytest.raises(CorruptFileError, match=r"lacking 1 tensors: " + key.replace(".", r"\.")):
        check_base_tensors(without, "a.safetensors")
    reshaped = dict(ref)
    reshaped[key] = ((1280, 1280, 1, 1), ref[key][1])
    with pytest.raises(CorruptFileError, match=r"\[1280, 1280, 1, 1\] \(SDXL: \[1280, 1280, 3, 3\]\)"):
        check_base_tensors(reshaped, "b.safetensors")
    pid = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
    assert not ref[pid][1].is_floating_point  # an int64 position_ids is what SDXL holds, and passes above


@pytest.mark.parametrize("skip", [False, True])
def test_a_lokr_for_another_model_size_says_so_in_one_run(base, out_dir, tmp_path, skip):
    """Modules the base lacks *and* modules that do not fit: the size is named first, with or without skipping."""
    g = torch.Generator().manual_seed(0)
    lokr = write_lokr_file(tmp_path / "big.safetensors", {
        # full-size widths on layers the tiny base has ...
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": lokr_module((640, 640), g),
        "lora_te_text_model_encoder_layers_0_mlp_fc1": lokr_module((3072, 768), g),  # SD1.x-style TE name
        # ... and layers it lacks
        "lora_unet_input_blocks_4_1_transformer_blocks_7_attn1_to_q": lokr_module((640, 640), g),
    })
    with pytest.raises(ShapeMismatchError) as e:
        bake_lokr(base.path, [lokr], out_dir / "o.safetensors", skip_unmatched=skip, progress=False)
    msg = str(e.value)
    assert "for another model size: 2 of its 3 modules do not fit" in msg and "1 more have no layer" in msg
    _nothing_written(out_dir)


def test_messages_quote_a_module_as_the_file_spells_it(base, out_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    lokr = write_lokr_file(tmp_path / "sd1.safetensors", {"lora_te_text_model_encoder_layers_0_mlp_fc1": lokr_module((32, 32), g)})
    with pytest.raises(ShapeMismatchError) as e:
        bake_lokr(base.path, [lokr], out_dir / "o.safetensors", progress=False)
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1 (read as lora_te1_text_model_encoder_layers_0_mlp_fc1)" in str(e.value)


# ------------------------------------------------------------- damaged diffusers folders: the merge and load_sdxl agree

def _shard_unet(folder):
    import json

    from safetensors.torch import load_file, save_file

    unet = folder / "unet"
    t = load_file(unet / "diffusion_pytorch_model.safetensors")
    keys = sorted(t)
    names = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    halves = (keys[: len(keys) // 2], keys[len(keys) // 2:])
    for name, part in zip(names, halves):
        save_file({k: t[k] for k in part}, unet / name)
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    weight_map = {k: names[i] for i, part in enumerate(halves) for k in part}
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return unet


@pytest.mark.parametrize("damage,error,expect", [
    ("missing_shard", "MissingComponentError", "shard(s) that are missing: diffusion_pytorch_model-00002-of-00002"),
    ("index_not_a_table", "CorruptFileError", "weight_map is empty or not a table"),
    ("index_not_json", "CorruptFileError", "not a safetensors index"),
    ("config_a_list", "CorruptFileError", "holds a JSON list, not a config object"),
])
def test_a_damaged_diffusers_folder_gets_the_same_message_from_merge_and_load(tiny_sdxl, tmp_path, out_dir, damage, error, expect):
    import shutil

    from lokr_trainer.sdxl import load_sdxl

    folder = tmp_path / "d"
    shutil.copytree(tiny_sdxl.diffusers_dir, folder)
    unet = _shard_unet(folder)
    weighted_sum([folder], out_dir / "sharded_ok.safetensors", progress=False)  # the sharded folder itself is fine
    (out_dir / "sharded_ok.safetensors").unlink()
    index = unet / "diffusion_pytorch_model.safetensors.index.json"
    if damage == "missing_shard":
        (unet / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    elif damage == "index_not_a_table":
        index.write_text('{"weight_map": 5}')
    elif damage == "index_not_json":
        index.write_text('{"weight_map": ')
    else:
        (unet / "config.json").write_text("[1, 2]")
    for run in (lambda: weighted_sum([folder], out_dir / "o.safetensors", progress=False), lambda: load_sdxl(folder)):
        with pytest.raises(CheckpointError) as e:
            run()
        assert type(e.value).__name__ == error and expect in str(e.value) and str(unet) in str(e.value)
    _nothing_written(out_dir)


def test_unusable_config_values_are_an_error_not_a_traceback(tiny_sdxl, tmp_path, out_dir):
    import json
    import shutil

    folder = tmp_path / "d"
    shutil.copytree(tiny_sdxl.diffusers_dir, folder)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    del cfg["down_block_types"]  # what the merge reads the UNet's layout from
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptFileError, match="config.json is unusable"):
        weighted_sum([folder], out_dir / "o.safetensors", progress=False)
    _nothing_written(out_dir)
