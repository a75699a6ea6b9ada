"""SDXL network configs, built in (never fetched from a hub) and inferred from shapes.

A single-file checkpoint carries no config.  Everything that shapes determine
(channels, depths, widths, vocabulary) is read from the tensors, and the few
things they don't (attention head size, activations, scheduler) are SDXL's
fixed choices.  The same inference serves real SDXL and the tiny test model,
so the tests exercise the code path that real checkpoints take.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from lokr_trainer.errors import KeyMapError
from lokr_trainer.sdxl.keys import PREFIXES

Shape = Sequence[int]

#: SDXL uses 64-channel attention heads in the UNet and in both text encoders.
HEAD_DIM = 64

#: Latent scale of the SDXL VAE (no shift).
SDXL_VAE_SCALING_FACTOR = 0.13025

#: Noise schedule SDXL base was trained with (DESIGN.md §3), as diffusers' Euler config.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
    "clip_sample": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "trained_betas": None,
}

SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}

SDXL_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    # SDXL's published configs keep CLIP's legacy ids; with eos_token_id == 2
    # transformers pools at argmax(input_ids), i.e. the first EOS (49407).
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

SDXL_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    **SDXL_TEXT_ENCODER_CONFIG,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

SDXL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": SDXL_VAE_SCALING_FACTOR,
    "force_upcast": True,
}


def _strip(shapes: Mapping[str, Shape], component: str) -> dict[str, tuple[int, ...]]:
    prefix = PREFIXES[component]
    return {k[len(prefix) :]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}


def _need(shapes: Mapping[str, tuple[int, ...]], key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise KeyMapError(f"cannot infer the {what}: tensor {key!r} is missing")
    return shapes[key]


def infer_unet_config(file_shapes: Mapping[str, Shape]) -> dict[str, Any]:
    """UNet2DConditionModel config from single-file tensor shapes."""
    s = _strip(file_shapes, "unet")
    conv_in = _need(s, "input_blocks.0.0.weight", "UNet input channels")
    conv_out = _need(s, "out.2.weight", "UNet output channels")
    adm = _need(s, "label_emb.0.0.weight", "SDXL size/text embedding")

    resnet_out: dict[int, int] = {}
    depth: dict[int, int] = {}
    context_dim = None
    for k, shape in s.items():
        m = re.match(r"input_blocks\.(\d+)\.0\.out_layers\.3\.weight$", k)
        if m:
            resnet_out[int(m.group(1))] = shape[0]
        m = re.match(r"input_blocks\.(\d+)\.1\.transformer_blocks\.(\d+)\.", k)
        if m:
            n = int(m.group(1))
            depth[n] = max(depth.get(n, 0), int(m.group(2)) + 1)
        if k.endswith("attn2.to_k.weight"):
            context_dim = shape[1]
    has_down = sorted(int(m.group(1)) for k in s if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    lpb = (has_down[0] - 1) if has_down else len(resnet_out)
    stride = lpb + 1
    levels = (max(resnet_out) - 1) // stride + 1
    channels = [resnet_out[1 + i * stride] for i in range(levels)]
    level_depth = [depth.get(1 + i * stride, 0) for i in range(levels)]
    if context_dim is None:
        raise KeyMapError("cannot infer the cross-attention width: no attn2.to_k weight in the UNet")
    proj_in = s.get(f"input_blocks.{1 + level_depth.index(max(level_depth)) * stride}.1.proj_in.weight")
    te2_width = adm[1] - 6 * 256
    time_dim = 256
    # SDXL: adm_in = pooled TE2 width + 6 size ids x time_dim; pooled width is the
    # text_projection output, present in the same file.
    proj = file_shapes.get(PREFIXES["text_encoder_2"] + "text_projection")
    if proj is not None:
        te2_width = proj[1]
        time_dim = (adm[1] - te2_width) // 6
    return {
        "sample_size": 128,
        "in_channels": conv_in[1],
        "out_channels": conv_out[0],
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in level_depth],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(level_depth)],
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "transformer_layers_per_block": [max(d, 1) for d in level_depth],
        "attention_head_dim": [max(c // HEAD_DIM, 1) for c in channels],
        "cross_attention_dim": context_dim,
        "use_linear_projection": proj_in is None or len(proj_in) == 2,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": adm[1],
        "norm_num_groups": 32,
    }


def _infer_clip(s: Mapping[str, tuple[int, ...]], base: Mapping[str, Any], names: dict[str, str]) -> dict[str, Any]:
    tok = _need(s, names["token"], "text encoder vocabulary")
    pos = _need(s, names["pos"], "text encoder length")
    fc1 = _need(s, names["fc1"], "text encoder MLP width")
    layers = {int(m.group(1)) for k in s if (m := re.match(names["layer_re"], k))}
    hidden = tok[1]
    return {
        **base,
        "vocab_size": tok[0],
        "hidden_size": hidden,
        "intermediate_size": fc1[0],
        "num_hidden_layers": max(layers) + 1,
        "num_attention_heads": max(hidden // HEAD_DIM, 1),
        "max_position_embeddings": pos[0],
    }


def infer_text_encoder_config(file_shapes: Mapping[str, Shape]) -> dict[str, Any]:
    """CLIP-L (transformers CLIPTextConfig kwargs) from single-file shapes."""
    s = _strip(file_shapes, "text_encoder")
    cfg = _infer_clip(
        s,
        SDXL_TEXT_ENCODER_CONFIG,
        {
            "token": "text_model.embeddings.token_embedding.weight",
            "pos": "text_model.embeddings.position_embedding.weight",
            "fc1": "text_model.encoder.layers.0.mlp.fc1.weight",
            "layer_re": r"text_model\.encoder\.layers\.(\d+)\.",
        },
    )
    cfg["projection_dim"] = cfg["hidden_size"]
    return cfg


def infer_text_encoder_2_config(file_shapes: Mapping[str, Shape]) -> dict[str, Any]:
    """OpenCLIP bigG as transformers CLIPTextConfig kwargs from single-file shapes."""
    s = _strip(file_shapes, "text_encoder_2")
    cfg = _infer_clip(
        s,
        SDXL_TEXT_ENCODER_2_CONFIG,
        {
            "token": "token_embedding.weight",
            "pos": "positional_embedding",
            "fc1": "transformer.resblocks.0.mlp.c_fc.weight",
            "layer_re": r"transformer\.resblocks\.(\d+)\.",
        },
    )
    cfg["projection_dim"] = _need(s, "text_projection", "text projection width")[1]
    return cfg


def infer_vae_config(file_shapes: Mapping[str, Shape]) -> dict[str, Any]:
    """AutoencoderKL config from single-file shapes."""
    s = _strip(file_shapes, "vae")
    channels: dict[int, int] = {}
    blocks: set[int] = set()
    for k, shape in s.items():
        m = re.match(r"encoder\.down\.(\d+)\.block\.(\d+)\.conv2\.weight$", k)
        if m:
            channels[int(m.group(1))] = shape[0]
            blocks.add(int(m.group(2)))
    if not channels:
        raise KeyMapError("cannot infer the VAE: no encoder.down blocks")
    levels = max(channels) + 1
    quant = _need(s, "quant_conv.weight", "VAE latent channels")
    return {
        **SDXL_VAE_CONFIG,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [channels[i] for i in range(levels)],
        "layers_per_block": max(blocks) + 1,
        "latent_channels": quant[0] // 2,
        "in_channels": _need(s, "encoder.conv_in.weight", "VAE input channels")[1],
        "out_channels": _need(s, "decoder.conv_out.weight", "VAE output channels")[0],
    }


# --------------------------------------------------------------------------- tiny test model

#: Tiny SDXL-shaped configs (DESIGN.md §8): 2 UNet levels (32, 64), context 64 =
#: CLIP-L 32 + bigG 32, text_time conditioning, the real 49408-token vocabulary.
TINY_UNET_CONFIG: dict[str, Any] = {
    **SDXL_UNET_CONFIG,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [1, 1],
    "cross_attention_dim": 64,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
}

TINY_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    **SDXL_TEXT_ENCODER_CONFIG,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 1,
    "projection_dim": 32,
}

TINY_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    **SDXL_TEXT_ENCODER_2_CONFIG,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 1,
    "projection_dim": 32,
}

TINY_VAE_CONFIG: dict[str, Any] = {
    **SDXL_VAE_CONFIG,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [32, 64],
}
