"""Tensor-name maps between the SDXL single-file layout and diffusers/transformers.

One table, used everywhere a name crosses layouts: loading and saving
checkpoints, naming LoKr modules (``lora_unet_input_blocks_4_1_…``), reading
adapters written with diffusers paths, and the streaming merge.  It is pure
string logic (no diffusers import) so that ``lokr_trainer.merge`` can use it
without building any network.

Layouts
-------
* ``unet``: LDM/SGM names (``input_blocks.4.1.proj_in``) <-> diffusers
  ``UNet2DConditionModel`` names (``down_blocks.1.attentions.0.proj_in``).
* ``text_encoder`` (CLIP-L): the file already uses transformers names; the
  canonical model name is ``text_model.…`` (transformers 4 layout; transformers
  5's ``CLIPTextModel`` drops the ``text_model`` level, see :func:`live_name`).
* ``text_encoder_2`` (OpenCLIP bigG): open_clip names <-> transformers
  ``CLIPTextModelWithProjection``; ``in_proj_weight``/``in_proj_bias`` hold q, k, v
  stacked on dim 0; ``text_projection`` is stored (in, out) and used as ``x @ P``,
  transformers stores its transpose.
* ``vae``: LDM names <-> diffusers ``AutoencoderKL`` (attention 1x1 convs become
  linears; decoder levels are numbered in reverse).

Every map works on module names as well as parameter names, so
``unet_ldm_to_diffusers("input_blocks.4.1.transformer_blocks.0.attn1.to_q")`` and
``…to_q.weight`` both convert.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import torch

from lokr_trainer.errors import KeyMapError

from lokr_trainer.sdxl import layout

# re-exported: older imports of these facts from sdxl.keys keep working (their home is sdxl.layout)
COMPONENTS, PREFIXES, PASSTHROUGH_KEYS = layout.COMPONENTS, layout.PREFIXES, layout.PASSTHROUGH_KEYS


def component_of(file_key: str) -> str | None:
    """The component a single-file key belongs to, or None for foreign keys."""
    for name, prefix in PREFIXES.items():
        if file_key.startswith(prefix):
            return name
    return None


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class UNetLayout:
    """What the LDM block numbering depends on.

    ``attn_levels`` are the down levels that hold transformer blocks; up level
    ``i`` mirrors down level ``num_levels - 1 - i``.
    """

    num_levels: int = 3
    layers_per_block: int = 2
    attn_levels: tuple[int, ...] = (1, 2)

    def up_has_attention(self, up_level: int) -> bool:
        return (self.num_levels - 1 - up_level) in self.attn_levels

    @classmethod
    def from_diffusers_config(cls, config: Mapping) -> "UNetLayout":
        """The layout of a diffusers ``UNet2DConditionModel`` config (a dict or the model's FrozenDict)."""
        down = list(config["down_block_types"])
        lpb = config.get("layers_per_block", 2)
        return cls(
            num_levels=len(down),
            layers_per_block=lpb if isinstance(lpb, int) else int(lpb[0]),
            attn_levels=tuple(i for i, t in enumerate(down) if "CrossAttn" in t),
        )

    @classmethod
    def from_ldm_keys(cls, keys: Iterable[str]) -> "UNetLayout":
        """Infer the layout from LDM UNet names (without the file prefix)."""
        keys = list(keys)
        resnet_blocks: set[int] = set()
        attn_blocks: set[int] = set()
        down_blocks: set[int] = set()
        for k in keys:
            m = re.match(r"input_blocks\.(\d+)\.(\d+)\.(\w+)", k)
            if not m:
                continue
            n, sub, head = int(m.group(1)), int(m.group(2)), m.group(3)
            if n == 0:
                continue
            if head == "op":
                down_blocks.add(n)
            elif sub == 0:
                resnet_blocks.add(n)
            else:
                attn_blocks.add(n)
        if not resnet_blocks:
            raise KeyMapError("no UNet input_blocks found: not an SDXL-style UNet")
        if down_blocks:
            lpb = min(down_blocks) - 1
        else:  # a single level: all blocks are resnets of level 0
            lpb = len(resnet_blocks)
        stride = lpb + 1
        num_levels = (max(resnet_blocks) - 1) // stride + 1
        attn_levels = tuple(sorted({(n - 1) // stride for n in attn_blocks}))
        return cls(num_levels=num_levels, layers_per_block=lpb, attn_levels=attn_levels)


@dataclass(frozen=True)
class VAELayout:
    """Number of resolution levels; the decoder numbers them in reverse."""

    num_levels: int = 4

    @classmethod
    def from_ldm_keys(cls, keys: Iterable[str]) -> "VAELayout":
        levels = {int(m.group(1)) for k in keys if (m := re.match(r"encoder\.down\.(\d+)\.", k))}
        if not levels:
            raise KeyMapError("no VAE encoder.down blocks found")
        return cls(num_levels=max(levels) + 1)


SDXL_UNET_LAYOUT = UNetLayout()
SDXL_VAE_LAYOUT = VAELayout()


# --------------------------------------------------------------------------- helpers


def _swap_head(name: str, table: Iterable[tuple[str, str]]) -> str:
    """Replace the first matching leading path segment(s) of ``name``."""
    for old, new in table:
        if name == old:
            return new
        if name.startswith(old + "."):
            return new + name[len(old) :]
    return name


_UNET_RESNET_LDM_TO_DIFF = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)
_UNET_RESNET_DIFF_TO_LDM = tuple((b, a) for a, b in _UNET_RESNET_LDM_TO_DIFF)

_UNET_TOP_LDM_TO_DIFF = (
    ("input_blocks.0.0", "conv_in"),
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("label_emb.0.0", "add_embedding.linear_1"),
    ("label_emb.0.2", "add_embedding.linear_2"),
    ("out.0", "conv_norm_out"),
    ("out.2", "conv_out"),
)
_UNET_TOP_DIFF_TO_LDM = tuple((b, a) for a, b in _UNET_TOP_LDM_TO_DIFF)


def _rest(name: str, head_len: int) -> str:
    """The part of ``name`` after its first ``head_len`` dotted segments ('' or '.…')."""
    parts = name.split(".")
    tail = parts[head_len:]
    return ("." + ".".join(tail)) if tail else ""


def _resnet_rest(rest: str, table) -> str:
    if not rest:
        return rest
    return "." + _swap_head(rest[1:], table)


# --------------------------------------------------------------------------- UNet


def unet_ldm_to_diffusers(name: str, layout: UNetLayout = SDXL_UNET_LAYOUT) -> str:
    """``input_blocks.4.1.proj_in.weight`` -> ``down_blocks.1.attentions.0.proj_in.weight``."""
    for old, new in _UNET_TOP_LDM_TO_DIFF:
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    stride = layout.layers_per_block + 1
    parts = name.split(".")
    try:
        if parts[0] == "input_blocks":
            n, sub = int(parts[1]), int(parts[2])
            level, j = divmod(n - 1, stride)
            rest = _rest(name, 3)
            if n >= 1 and level < layout.num_levels:
                if j == layout.layers_per_block:
                    if sub == 0 and rest.startswith(".op"):
                        return f"down_blocks.{level}.downsamplers.0.conv" + rest[3:]
                elif sub == 0:
                    return f"down_blocks.{level}.resnets.{j}" + _resnet_rest(rest, _UNET_RESNET_LDM_TO_DIFF)
                elif sub == 1 and level in layout.attn_levels:
                    return f"down_blocks.{level}.attentions.{j}" + rest
        elif parts[0] == "middle_block":
            sub = int(parts[1])
            rest = _rest(name, 2)
            if sub in (0, 2):
                return f"mid_block.resnets.{sub // 2}" + _resnet_rest(rest, _UNET_RESNET_LDM_TO_DIFF)
            if sub == 1:
                return "mid_block.attentions.0" + rest
        elif parts[0] == "output_blocks":
            n, sub = int(parts[1]), int(parts[2])
            level, j = divmod(n, stride)
            rest = _rest(name, 3)
            if level < layout.num_levels:
                if sub == 0:
                    return f"up_blocks.{level}.resnets.{j}" + _resnet_rest(rest, _UNET_RESNET_LDM_TO_DIFF)
                is_upsampler = rest == ".conv" or rest.startswith(".conv.")
                if (
                    is_upsampler
                    and j == layout.layers_per_block
                    and level < layout.num_levels - 1
                    and sub == (2 if layout.up_has_attention(level) else 1)
                ):
                    return f"up_blocks.{level}.upsamplers.0.conv" + rest[5:]
                if sub == 1 and not is_upsampler and layout.up_has_attention(level):
                    return f"up_blocks.{level}.attentions.{j}" + rest
    except (IndexError, ValueError):
        pass
    raise KeyMapError(f"UNet name {name!r} has no diffusers counterpart in layout {layout}")


def unet_diffusers_to_ldm(name: str, layout: UNetLayout = SDXL_UNET_LAYOUT) -> str:
    """``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in``."""
    for old, new in _UNET_TOP_DIFF_TO_LDM:
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    stride = layout.layers_per_block + 1
    parts = name.split(".")
    try:
        if parts[0] == "down_blocks":
            level, kind = int(parts[1]), parts[2]
            if level < layout.num_levels:
                if kind == "downsamplers" and parts[3] == "0" and parts[4] == "conv":
                    return f"input_blocks.{(level + 1) * stride}.0.op" + _rest(name, 5)
                j = int(parts[3])
                n = 1 + level * stride + j
                rest = _rest(name, 4)
                if kind == "resnets" and j < layout.layers_per_block:
                    return f"input_blocks.{n}.0" + _resnet_rest(rest, _UNET_RESNET_DIFF_TO_LDM)
                if kind == "attentions" and j < layout.layers_per_block and level in layout.attn_levels:
                    return f"input_blocks.{n}.1" + rest
        elif parts[0] == "mid_block":
            kind, j = parts[1], int(parts[2])
            rest = _rest(name, 3)
            if kind == "resnets" and j in (0, 1):
                return f"middle_block.{2 * j}" + _resnet_rest(rest, _UNET_RESNET_DIFF_TO_LDM)
            if kind == "attentions" and j == 0:
                return "middle_block.1" + rest
        elif parts[0] == "up_blocks":
            level, kind = int(parts[1]), parts[2]
            if level < layout.num_levels:
                if kind == "upsamplers" and parts[3] == "0" and parts[4] == "conv":
                    sub = 2 if layout.up_has_attention(level) else 1
                    return f"output_blocks.{level * stride + layout.layers_per_block}.{sub}.conv" + _rest(name, 5)
                j = int(parts[3])
                n = level * stride + j
                rest = _rest(name, 4)
                if kind == "resnets" and j <= layout.layers_per_block:
                    return f"output_blocks.{n}.0" + _resnet_rest(rest, _UNET_RESNET_DIFF_TO_LDM)
                if kind == "attentions" and j <= layout.layers_per_block and layout.up_has_attention(level):
                    return f"output_blocks.{n}.1" + rest
    except (IndexError, ValueError):
        pass
    raise KeyMapError(f"diffusers UNet name {name!r} has no LDM counterpart in layout {layout}")


# --------------------------------------------------------------------------- VAE

_VAE_INNER_LDM_TO_DIFF = (
    ("nin_shortcut", "conv_shortcut"),
    ("norm", "group_norm"),
    ("q", "to_q"),
    ("k", "to_k"),
    ("v", "to_v"),
    ("proj_out", "to_out.0"),
)
_VAE_INNER_DIFF_TO_LDM = tuple((b, a) for a, b in _VAE_INNER_LDM_TO_DIFF)
_VAE_TOP = (
    ("norm_out", "conv_norm_out"),
    ("mid.block_1", "mid_block.resnets.0"),
    ("mid.block_2", "mid_block.resnets.1"),
    ("mid.attn_1", "mid_block.attentions.0"),
)


def _vae_side(name: str) -> tuple[str, str]:
    side, _, rest = name.partition(".")
    if side not in ("encoder", "decoder"):
        return "", name
    return side, rest


def vae_ldm_to_diffusers(name: str, layout: VAELayout = SDXL_VAE_LAYOUT) -> str:
    """``decoder.up.3.block.0.nin_shortcut`` -> ``decoder.up_blocks.0.resnets.0.conv_shortcut``."""
    if name.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return name
    side, rest = _vae_side(name)
    if not side:
        raise KeyMapError(f"VAE name {name!r} has no diffusers counterpart")
    parts = rest.split(".")
    try:
        if parts[0] in ("conv_in", "conv_out"):
            return name
        for old, new in _VAE_TOP:
            if rest == old or rest.startswith(old + "."):
                inner = rest[len(old) + 1 :]
                if old == "mid.attn_1":
                    inner = _swap_head(inner, _VAE_INNER_LDM_TO_DIFF)
                elif inner:
                    inner = _swap_head(inner, _VAE_INNER_LDM_TO_DIFF[:1])
                return f"{side}.{new}" + (("." + inner) if inner else "")
        if parts[0] in ("down", "up"):
            level = int(parts[1])
            if level >= layout.num_levels:
                raise ValueError
            blocks = "down_blocks" if parts[0] == "down" else "up_blocks"
            d_level = level if parts[0] == "down" else layout.num_levels - 1 - level
            if parts[2] == "block":
                inner = _swap_head(".".join(parts[4:]), _VAE_INNER_LDM_TO_DIFF[:1])
                return f"{side}.{blocks}.{d_level}.resnets.{int(parts[3])}" + (("." + inner) if inner else "")
            if parts[2] in ("downsample", "upsample") and parts[3] == "conv":
                sampler = "downsamplers" if parts[2] == "downsample" else "upsamplers"
                return f"{side}.{blocks}.{d_level}.{sampler}.0.conv" + _rest(rest, 4)
    except (IndexError, ValueError):
        pass
    raise KeyMapError(f"VAE name {name!r} has no diffusers counterpart")


def vae_diffusers_to_ldm(name: str, layout: VAELayout = SDXL_VAE_LAYOUT) -> str:
    """Inverse of :func:`vae_ldm_to_diffusers`."""
    if name.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return name
    side, rest = _vae_side(name)
    if not side:
        raise KeyMapError(f"diffusers VAE name {name!r} has no LDM counterpart")
    parts = rest.split(".")
    try:
        if parts[0] in ("conv_in", "conv_out"):
            return name
        for old, new in _VAE_TOP:
            if rest == new or rest.startswith(new + "."):
                inner = rest[len(new) + 1 :]
                if old == "mid.attn_1":
                    inner = _swap_head(inner, _VAE_INNER_DIFF_TO_LDM)
                elif inner:
                    inner = _swap_head(inner, _VAE_INNER_DIFF_TO_LDM[:1])
                return f"{side}.{old}" + (("." + inner) if inner else "")
        if parts[0] in ("down_blocks", "up_blocks"):
            d_level = int(parts[1])
            if d_level >= layout.num_levels:
                raise ValueError
            ldm = "down" if parts[0] == "down_blocks" else "up"
            level = d_level if ldm == "down" else layout.num_levels - 1 - d_level
            if parts[2] == "resnets":
                inner = _swap_head(".".join(parts[4:]), _VAE_INNER_DIFF_TO_LDM[:1])
                return f"{side}.{ldm}.{level}.block.{int(parts[3])}" + (("." + inner) if inner else "")
            if parts[2] in ("downsamplers", "upsamplers") and parts[3] == "0" and parts[4] == "conv":
                sampler = "downsample" if ldm == "down" else "upsample"
                return f"{side}.{ldm}.{level}.{sampler}.conv" + _rest(rest, 5)
    except (IndexError, ValueError):
        pass
    raise KeyMapError(f"diffusers VAE name {name!r} has no LDM counterpart")


def is_vae_attention_weight(diffusers_name: str) -> bool:
    """LDM stores these as 1x1 convs (C, C, 1, 1); diffusers as linears (C, C)."""
    return ".mid_block.attentions." in diffusers_name and diffusers_name.endswith(
        ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
    )


# --------------------------------------------------------------------------- OpenCLIP bigG

_OPENCLIP_TOP = (
    ("token_embedding", "text_model.embeddings.token_embedding"),
    ("ln_final", "text_model.final_layer_norm"),
)
_OPENCLIP_BLOCK = (
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
    ("attn.out_proj", "self_attn.out_proj"),
)
QKV = ("q_proj", "k_proj", "v_proj")


def openclip_to_hf(name: str) -> str | tuple[str, str, str]:
    """Map an open_clip bigG name to transformers.

    Returns a tuple of three names (q, k, v) for ``attn.in_proj_weight/bias``.
    ``positional_embedding`` and ``text_projection`` are whole tensors whose
    transformers names carry ``.weight``.
    """
    if name == "positional_embedding":
        return "text_model.embeddings.position_embedding.weight"
    if name == "text_projection":
        return "text_projection.weight"
    for old, new in _OPENCLIP_TOP:
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", name)
    if m:
        layer, inner = m.group(1), m.group(2)
        base = f"text_model.encoder.layers.{layer}."
        if inner in ("attn.in_proj_weight", "attn.in_proj_bias"):
            suffix = inner.rsplit("_", 1)[1]
            return tuple(f"{base}self_attn.{p}.{suffix}" for p in QKV)  # type: ignore[return-value]
        if inner == "attn.in_proj":  # module name (LoKr targets)
            return tuple(f"{base}self_attn.{p}" for p in QKV)  # type: ignore[return-value]
        mapped = _swap_head(inner, _OPENCLIP_BLOCK)
        if mapped != inner:
            return base + mapped
    raise KeyMapError(f"OpenCLIP name {name!r} has no transformers counterpart")


def hf_to_openclip(name: str) -> tuple[str, int | None]:
    """Map a transformers bigG name (canonical ``text_model.…``) to open_clip.

    Returns ``(open_clip_name, qkv_index)``; ``qkv_index`` is 0/1/2 when the
    tensor is the q/k/v slice of ``in_proj_weight``/``in_proj_bias`` (or of the
    ``attn.in_proj`` module for module names), else None.
    """
    if name == "text_model.embeddings.position_embedding.weight":
        return "positional_embedding", None
    if name in ("text_projection.weight", "text_projection"):
        return "text_projection", None
    for old, new in _OPENCLIP_TOP:
        if name == new or name.startswith(new + "."):
            return old + name[len(new) :], None
    m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)$", name)
    if m:
        layer, inner = m.group(1), m.group(2)
        base = f"transformer.resblocks.{layer}."
        qm = re.match(r"self_attn\.(q_proj|k_proj|v_proj)(?:\.(weight|bias))?$", inner)
        if qm:
            idx = QKV.index(qm.group(1))
            if qm.group(2) is None:
                return base + "attn.in_proj", idx
            return base + f"attn.in_proj_{qm.group(2)}", idx
        for old, new in _OPENCLIP_BLOCK:
            if inner == new or inner.startswith(new + "."):
                return base + old + inner[len(new) :], None
    raise KeyMapError(f"transformers bigG name {name!r} has no open_clip counterpart")


# --------------------------------------------------------------------------- canonical names


def _is_flat_clip(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) == "clip_text_model" and not hasattr(model, "text_model")


def live_name(canonical: str, model: torch.nn.Module) -> str:
    """Canonical ``text_model.…`` name -> the name in this transformers version's module.

    transformers 5 removed the ``text_model`` level from ``CLIPTextModel`` (not
    from ``CLIPTextModelWithProjection``).
    """
    if canonical.startswith("text_model.") and _is_flat_clip(model):
        return canonical[len("text_model.") :]
    return canonical


def canonical_name(live: str, model: torch.nn.Module) -> str:
    """Inverse of :func:`live_name`."""
    if _is_flat_clip(model) and live.startswith(("embeddings.", "encoder.", "final_layer_norm")):
        return "text_model." + live
    return live


# --------------------------------------------------------------------------- whole-state conversion


@dataclass(frozen=True)
class Layouts:
    unet: UNetLayout = SDXL_UNET_LAYOUT
    vae: VAELayout = SDXL_VAE_LAYOUT

    @classmethod
    def from_file_keys(cls, keys: Iterable[str]) -> "Layouts":
        keys = list(keys)
        u = [k[len(PREFIXES["unet"]) :] for k in keys if k.startswith(PREFIXES["unet"])]
        v = [k[len(PREFIXES["vae"]) :] for k in keys if k.startswith(PREFIXES["vae"])]
        return cls(unet=UNetLayout.from_ldm_keys(u), vae=VAELayout.from_ldm_keys(v))


def file_key_to_model(file_key: str, layouts: Layouts) -> tuple[str, tuple[str, ...] | str]:
    """Single-file key -> (component, canonical model name or q/k/v names)."""
    comp = component_of(file_key)
    if comp is None or file_key in PASSTHROUGH_KEYS:
        raise KeyMapError(f"{file_key!r} is not a parameter of an SDXL component")
    name = file_key[len(PREFIXES[comp]) :]
    if comp == "unet":
        return comp, unet_ldm_to_diffusers(name, layouts.unet)
    if comp == "text_encoder":
        if not name.startswith("text_model."):
            raise KeyMapError(f"CLIP-L key {file_key!r} lacks the 'text_model.' level")
        return comp, name
    if comp == "text_encoder_2":
        return comp, openclip_to_hf(name)
    return comp, vae_ldm_to_diffusers(name, layouts.vae)


def model_name_to_file_key(component: str, canonical: str, layouts: Layouts) -> tuple[str, int | None]:
    """Canonical model name -> (single-file key, q/k/v index or None)."""
    prefix = PREFIXES[component]
    if component == "unet":
        return prefix + unet_diffusers_to_ldm(canonical, layouts.unet), None
    if component == "text_encoder":
        return prefix + canonical, None
    if component == "text_encoder_2":
        name, idx = hf_to_openclip(canonical)
        return prefix + name, idx
    if component == "vae":
        return prefix + vae_diffusers_to_ldm(canonical, layouts.vae), None
    raise KeyMapError(f"unknown component {component!r}")


def convert_file_tensor(
    file_key: str, tensor: torch.Tensor, layouts: Layouts
) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Turn one single-file tensor into (component, canonical name, tensor) pieces.

    No copies except the bigG ``text_projection`` transpose (made contiguous)
    and q/k/v slices (views of the stacked tensor).
    """
    comp, target = file_key_to_model(file_key, layouts)
    if isinstance(target, tuple):
        if tensor.shape[0] % 3:
            raise KeyMapError(f"{file_key}: first dimension {tensor.shape[0]} is not divisible into q, k, v")
        for name, part in zip(target, tensor.chunk(3, dim=0)):
            yield comp, name, part
        return
    if comp == "text_encoder_2" and target == "text_projection.weight":
        tensor = tensor.t().contiguous()
    elif comp == "vae" and is_vae_attention_weight(target) and tensor.ndim == 4:
        tensor = tensor[:, :, 0, 0]
    yield comp, target, tensor


def model_state_to_file(
    component: str, state: Mapping[str, torch.Tensor], layouts: Layouts
) -> Iterator[tuple[str, torch.Tensor]]:
    """Turn one component's canonical state into single-file (key, tensor) pairs.

    q/k/v of bigG are concatenated back into ``in_proj_*`` in q, k, v order.
    """
    pending: dict[str, list[torch.Tensor | None]] = {}
    for name, tensor in state.items():
        key, idx = model_name_to_file_key(component, name, layouts)
        if idx is not None:
            slots = pending.setdefault(key, [None, None, None])
            slots[idx] = tensor
            if all(s is not None for s in slots):
                yield key, torch.cat(slots, dim=0)  # type: ignore[arg-type]
                del pending[key]
            continue
        if component == "text_encoder_2" and key.endswith(".text_projection"):
            tensor = tensor.t().contiguous()
        elif component == "vae" and is_vae_attention_weight(name) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        yield key, tensor
    if pending:
        raise KeyMapError(f"incomplete q/k/v sets for {sorted(pending)}")
