"""Key maps: full-size SDXL on the meta device, and diffusers' converters as an oracle."""

from __future__ import annotations

import pytest
import torch

from lokr_trainer.errors import KeyMapError
from lokr_trainer.sdxl import configs
from lokr_trainer.sdxl.keys import (
    COMPONENTS,
    PASSTHROUGH_KEYS,
    PREFIXES,
    Layouts,
    UNetLayout,
    canonical_name,
    component_of,
    convert_file_tensor,
    file_key_to_model,
    hf_to_openclip,
    model_name_to_file_key,
    model_state_to_file,
    openclip_to_hf,
    unet_diffusers_to_ldm,
    unet_ldm_to_diffusers,
)
from lokr_trainer.sdxl.load import build_empty, infer_configs
from sdxl_reference import sdxl_base_keys, sdxl_base_shapes

EXPECTED_COUNTS = {"unet": 1680, "text_encoder": 197, "text_encoder_2": 390, "vae": 248}


@pytest.fixture(scope="module")
def full_models():
    cfgs = infer_configs(sdxl_base_shapes())
    return {c: build_empty(c, cfgs[c]) for c in COMPONENTS}


def test_reference_list_has_the_published_counts():
    keys = sdxl_base_keys()
    counts = {c: sum(component_of(k) == c for k in keys) for c in COMPONENTS}
    assert counts == EXPECTED_COUNTS
    assert len(keys) == 2515


def test_shape_inference_gives_the_sdxl_base_configs():
    cfgs = infer_configs(sdxl_base_shapes())
    for comp, ref in [
        ("unet", configs.SDXL_UNET_CONFIG),
        ("text_encoder", configs.SDXL_TEXT_ENCODER_CONFIG),
        ("text_encoder_2", configs.SDXL_TEXT_ENCODER_2_CONFIG),
        ("vae", configs.SDXL_VAE_CONFIG),
    ]:
        assert {k: cfgs[comp][k] for k in ref} == ref, comp


def test_full_size_models_produce_every_key_with_its_shape(full_models):
    ref = sdxl_base_shapes()
    layouts = Layouts.from_file_keys(ref)
    produced: dict[str, tuple[int, ...]] = {}
    for comp, model in full_models.items():
        state = {canonical_name(k, model): v for k, v in model.state_dict().items()}
        for key, tensor in model_state_to_file(comp, state, layouts):
            assert key not in produced, f"two parameters map to {key}"
            produced[key] = tuple(tensor.shape)
    assert set(produced) | PASSTHROUGH_KEYS == set(ref)
    assert {k: ref[k] for k in produced} == produced


def test_every_file_key_maps_to_exactly_one_parameter_and_back(full_models):
    ref = sdxl_base_shapes()
    layouts = Layouts.from_file_keys(ref)
    params = {
        comp: {canonical_name(k, m): tuple(v.shape) for k, v in m.state_dict().items()}
        for comp, m in full_models.items()
    }
    hit: dict[tuple[str, str], str] = {}
    for key, shape in ref.items():
        if key in PASSTHROUGH_KEYS:
            continue
        meta = torch.empty(shape, device="meta")
        pieces = list(convert_file_tensor(key, meta, layouts))
        for comp, name, tensor in pieces:
            assert name in params[comp], f"{key} -> {name} is not a {comp} parameter"
            assert tuple(tensor.shape) == params[comp][name]
            assert (comp, name) not in hit, f"{key} and {hit[(comp, name)]} both map to {name}"
            hit[(comp, name)] = key
            back, idx = model_name_to_file_key(comp, name, layouts)
            assert back == key
            assert (idx is not None) == (len(pieces) == 3)
    assert set(hit) == {(c, n) for c, p in params.items() for n in p}


def test_bigg_qkv_and_projection_names():
    assert openclip_to_hf("transformer.resblocks.31.attn.in_proj_weight") == tuple(
        f"text_model.encoder.layers.31.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")
    )
    assert hf_to_openclip("text_model.encoder.layers.3.self_attn.v_proj.bias") == (
        "transformer.resblocks.3.attn.in_proj_bias",
        2,
    )
    assert hf_to_openclip("text_model.encoder.layers.3.self_attn.k_proj") == ("transformer.resblocks.3.attn.in_proj", 1)
    assert hf_to_openclip("text_projection.weight") == ("text_projection", None)


def test_unet_module_names_convert_both_ways():
    pairs = {
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
        "output_blocks.2.0.in_layers.2": "up_blocks.0.resnets.2.conv1",
        "output_blocks.2.2.conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
        "middle_block.2.emb_layers.1": "mid_block.resnets.1.time_emb_proj",
        "label_emb.0.0": "add_embedding.linear_1",
        "output_blocks.8.0.skip_connection": "up_blocks.2.resnets.2.conv_shortcut",
    }
    for ldm, diff in pairs.items():
        assert unet_ldm_to_diffusers(ldm) == diff
        assert unet_diffusers_to_ldm(diff) == ldm


@pytest.mark.parametrize(
    "bad",
    ["input_blocks.1.1.proj_in", "output_blocks.9.0.in_layers.0", "up_blocks.2.upsamplers.0.conv", "foo.bar"],
)
def test_names_outside_the_layout_are_errors(bad):
    with pytest.raises(KeyMapError):
        try:
            unet_ldm_to_diffusers(bad)
        except KeyMapError:
            unet_diffusers_to_ldm(bad)
            raise


def test_layout_inference_of_tiny_unet():
    keys = ["input_blocks.1.0.in_layers.0.weight", "input_blocks.3.0.op.weight", "input_blocks.4.1.proj_in.weight",
            "input_blocks.5.0.in_layers.0.weight"]
    assert UNetLayout.from_ldm_keys(keys) == UNetLayout(num_levels=2, layers_per_block=2, attn_levels=(1,))


def test_diffusers_converters_agree_on_full_size_names():
    """diffusers' own LDM->diffusers converters give the same names and shapes."""
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    from accelerate import init_empty_weights

    ref = sdxl_base_shapes()
    ckpt = {k: torch.empty(s, device="meta") for k, s in ref.items()}
    layouts = Layouts.from_file_keys(ref)
    ours: dict[str, dict[str, tuple[int, ...]]] = {c: {} for c in COMPONENTS}
    for key in ref:
        if key in PASSTHROUGH_KEYS:
            continue
        for comp, name, t in convert_file_tensor(key, ckpt[key], layouts):
            ours[comp][name] = tuple(t.shape)

    unet = sfu.convert_ldm_unet_checkpoint(dict(ckpt), dict(configs.SDXL_UNET_CONFIG))
    assert {k: tuple(v.shape) for k, v in unet.items()} == ours["unet"]
    vae = sfu.convert_ldm_vae_checkpoint(dict(ckpt), dict(configs.SDXL_VAE_CONFIG))
    assert {k: tuple(v.shape) for k, v in vae.items()} == ours["vae"]
    te1 = sfu.convert_ldm_clip_checkpoint(
        {k: v for k, v in ckpt.items() if k.startswith(PREFIXES["text_encoder"]) and k not in PASSTHROUGH_KEYS},
        remove_prefix=PREFIXES["text_encoder"],
    )
    assert {k: tuple(v.shape) for k, v in te1.items()} == ours["text_encoder"]
    with init_empty_weights():
        te2_model = CLIPTextModelWithProjection(CLIPTextConfig(**configs.SDXL_TEXT_ENCODER_2_CONFIG))
    te2 = sfu.convert_open_clip_checkpoint(te2_model, dict(ckpt), prefix=PREFIXES["text_encoder_2"])
    te2.pop("text_model.embeddings.position_ids", None)
    assert {k: tuple(v.shape) for k, v in te2.items()} == ours["text_encoder_2"]


def test_unknown_prefix_is_not_a_parameter():
    with pytest.raises(KeyMapError):
        file_key_to_model("cond_stage_model.transformer.text_model.final_layer_norm.weight", Layouts())
