"""The explicit SDXL LoKr name table and name parsing (no models built)."""

from __future__ import annotations

import pytest

from lokr_trainer.errors import KeyMapError
from lokr_trainer.lokr.names import (
    ADAPTER_COMPONENTS,
    ModuleTable,
    lokr_name_to_sdxl_key,
    normalize_lokr_name,
    parse_lokr_name,
    sdxl_module_table,
    underscore_to_dotted,
)
from lokr_trainer.sdxl.configs import TINY_TEXT_ENCODER_CONFIG, TINY_TEXT_ENCODER_2_CONFIG, TINY_UNET_CONFIG
from lokr_trainer.sdxl.keys import UNetLayout, unet_ldm_to_diffusers
from lokr_trainer.sdxl.reference import sdxl_base_keys

UNET = "model.diffusion_model."
TINY_LAYOUT = UNetLayout(num_levels=2, layers_per_block=2, attn_levels=(1,))


def _tiny_table() -> ModuleTable:
    return ModuleTable.from_configs(
        TINY_UNET_CONFIG, TINY_TEXT_ENCODER_CONFIG["num_hidden_layers"], TINY_TEXT_ENCODER_2_CONFIG["num_hidden_layers"]
    )


def test_sdxl_table_is_exactly_every_unet_linear_and_conv_of_the_real_file():
    keys = sdxl_base_keys()
    real = {
        k[len(UNET) : -len(".weight")]
        for k, (shape, _) in keys.items()
        if k.startswith(UNET) and k.endswith(".weight") and len(shape) >= 2
    }
    table = {e.path for e in sdxl_module_table().component("unet")}
    assert table == real
    assert len(table) == 794


def test_sdxl_table_counts_per_component_and_kind():
    t = sdxl_module_table()
    assert {c: len(t.component(c)) for c in ADAPTER_COMPONENTS} == {"unet": 794, "te1": 72, "te2": 192}
    kinds = {}
    for e in t.entries:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    # 70 transformer blocks (2+2+10+10 down, 10 mid, 3*10+3*2 up) x 8 attention linears
    assert kinds["attn"] == 70 * 8 and kinds["ff"] == 70 * 2 and kinds["proj"] == 11 * 2
    assert kinds["resnet_conv"] == 17 * 2 and kinds["resnet_time"] == 17 and kinds["skip"] == 11


def test_every_sdxl_name_maps_to_one_distinct_real_weight_with_matching_rows():
    keys = sdxl_base_keys()
    seen: dict[tuple[str, int | None], str] = {}
    for e in sdxl_module_table().entries:
        key, idx = lokr_name_to_sdxl_key(e.lokr_name)
        assert key in keys, (e.lokr_name, key)
        assert (key, idx) not in seen, (e.lokr_name, seen.get((key, idx)))
        seen[(key, idx)] = e.lokr_name
        shape = keys[key][0]
        assert len(shape) >= 2
        if idx is not None:
            assert shape[0] == 3 * shape[1] and e.component == "te2" and e.kind == "te_attn"
    # bigG q, k, v of one layer share in_proj_weight rows 0/1/2
    assert lokr_name_to_sdxl_key("lora_te2_text_model_encoder_layers_31_self_attn_k_proj") == (
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
        1,
    )
    assert lokr_name_to_sdxl_key("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") == (
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        None,
    )
    assert lokr_name_to_sdxl_key("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") == (
        UNET + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        None,
    )


def test_design_examples_and_consumer_spellings():
    t = sdxl_module_table()
    for name in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_output_blocks_2_0_in_layers_2",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_31_mlp_fc1",
        "lora_unet_output_blocks_2_2_conv",  # SDXL's upsampler (A1111's SD1 rule gets this wrong)
        "lora_unet_input_blocks_3_0_op",
        "lora_unet_label_emb_0_0",
    ):
        assert name in t
        assert normalize_lokr_name(name) == name


def test_diffusers_spelling_of_every_unet_module_reads_back_as_ldm():
    for e in sdxl_module_table().component("unet"):
        diffusers = unet_ldm_to_diffusers(e.path).replace(".", "_")
        assert normalize_lokr_name("lora_unet_" + diffusers) == e.lokr_name
        assert normalize_lokr_name("lycoris_" + diffusers) == e.lokr_name


def test_text_encoder_spellings_other_tools_write():
    # transformers-5 LyCORIS names lack text_model; lora_te_ is a lone CLIP-L
    assert normalize_lokr_name("lora_te1_encoder_layers_3_self_attn_v_proj") == (
        "lora_te1_text_model_encoder_layers_3_self_attn_v_proj"
    )
    assert normalize_lokr_name("lora_te_text_model_encoder_layers_11_mlp_fc2") == (
        "lora_te1_text_model_encoder_layers_11_mlp_fc2"
    )


@pytest.mark.parametrize(
    "name",
    [
        "lora_unet_input_blocks_4_1_transformer_blocks_2_attn1_to_q",  # level 1 has depth 2
        "lora_unet_input_blocks_1_1_proj_in",  # level 0 has no attention
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_z",
        "lora_unet_input_blocks_4_0_norm1",
        "lora_te1_text_model_encoder_layers_12_mlp_fc1",  # CLIP-L has 12 layers
        "lora_te2_text_model_encoder_layers_0_layer_norm1",
        "lora_vae_decoder_conv_in",
        "lora_unet_down_blocks_0_attentions_0_proj_in",
    ],
)
def test_names_no_sdxl_module_has_are_errors_naming_them(name):
    with pytest.raises(KeyMapError, match=name):
        parse_lokr_name(name)


def test_underscore_split_is_unambiguous_for_every_table_name():
    for e in sdxl_module_table().entries:
        flat = e.lokr_name.split("_", 2)[2]
        assert underscore_to_dotted(flat) == e.path


def test_tiny_table_and_layout():
    t = _tiny_table()
    # 4 embedding linears, conv_in/out, 2 samplers, 12 resnets x 3 + 7 skips, 6 transformers x (2 proj + 2 blocks x 10)
    assert {c: len(t.component(c)) for c in ADAPTER_COMPONENTS} == {"unet": 183, "te1": 18, "te2": 18}
    unet = t.component("unet")
    # depth 2 at level 1: input 4, 5 and output 0, 1, 2 hold 2 blocks; output_blocks 2 has the upsampler at .2
    assert any(e.path == "output_blocks.2.2.conv" for e in unet)
    assert any(e.path == "input_blocks.5.1.transformer_blocks.1.attn2.to_out.0" for e in unet)
    assert not any(e.path.startswith("input_blocks.7") for e in unet)
    for e in t.entries:
        assert parse_lokr_name(e.lokr_name, TINY_LAYOUT, t) == (e.component, e.path)
    with pytest.raises(KeyMapError):
        parse_lokr_name("lora_unet_input_blocks_4_1_transformer_blocks_2_attn1_to_q", TINY_LAYOUT, t)
    assert lokr_name_to_sdxl_key("lora_unet_output_blocks_2_2_conv", TINY_LAYOUT, t) == (
        UNET + "output_blocks.2.2.conv.weight",
        None,
    )


def test_names_follow_the_consumer_key_rules():
    """The rules ComfyUI and A1111 map SDXL LoKr names by (research/lycoris.md §4), written out here."""
    import re

    keys = sdxl_base_keys()
    # ComfyUI: lora_unet_<LDM key without .weight, dots -> underscores> for every diffusion_model weight
    comfy_unet = {"lora_unet_" + k[len(UNET) : -len(".weight")].replace(".", "_") for k in keys if k.startswith(UNET)}
    # ComfyUI: lora_te{1,2}_text_model_encoder_layers_{b}_{c}, b < 32, c in q/k/v/out_proj, mlp_fc1/2
    parts = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")
    comfy_te = {f"lora_te{i}_text_model_encoder_layers_{b}_{c}" for i in (1, 2) for b in range(32) for c in parts}
    # A1111: TE2 by regex onto open_clip resblocks; TE1 by the lora_te1_text_model substring
    a1111_te2 = re.compile(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)")
    for e in sdxl_module_table().entries:
        if e.component == "unet":
            assert e.lokr_name in comfy_unet
        else:
            assert e.lokr_name in comfy_te
            if e.component == "te2":
                m = a1111_te2.fullmatch(e.lokr_name)
                assert m and int(m.group(1)) < 32 and m.group(2) in parts
            else:
                assert "lora_te1_text_model" in e.lokr_name
