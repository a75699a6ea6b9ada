"""The explicit SDXL table of LoKr module names.

Adapter files name modules ``lora_unet_<LDM path>``, ``lora_te1_<CLIP-L path>``
and ``lora_te2_<bigG path>`` with dots turned into underscores (DESIGN.md §4).
Those names must never be derived from the live module paths: diffusers
spells the UNet differently (``down_blocks.1.attentions.0``) and
transformers 5's ``CLIPTextModel`` has no ``text_model`` level, so path-derived
names come out as ``lora_te1_encoder_layers_…``, which ComfyUI and A1111
silently ignore.  This module therefore

* enumerates every LoKr-able module of an SDXL-shaped model from its
  *config* (:func:`module_table`), with its canonical path (LDM for the UNet,
  ``text_model.encoder.layers.N…`` for both text encoders) and its kind
  (attention, feed-forward, ResNet conv, …), which presets select on;
* turns any name that other tools write (LDM or diffusers UNet spelling,
  ``lycoris_`` prefix, ``lora_te_`` for a lone CLIP-L, TE names without
  ``text_model``) back into the canonical spelling (:func:`parse_lokr_name`);
* maps a LoKr name to the single-file weight it modifies
  (:func:`lokr_name_to_sdxl_key`), q/k/v row slice included for bigG.

Pure string logic on top of :mod:`lokr_trainer.sdxl.keys`: no diffusers or
transformers import, so the merge tool stays light.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any, Iterable, Iterator, Mapping, Sequence

from lokr_trainer.errors import KeyMapError
from lokr_trainer.sdxl.keys import (
    PREFIXES,
    SDXL_UNET_LAYOUT,
    UNetLayout,
    hf_to_openclip,
    unet_diffusers_to_ldm,
    unet_ldm_to_diffusers,
)

#: The adapter's component groups, in file order (not ``sdxl.layout.COMPONENTS``, the four networks).
ADAPTER_COMPONENTS: tuple[str, ...] = ("unet", "te1", "te2")

#: The ``SDXLModels`` attribute (and single-file component) of each of ours.
MODEL_ATTR: dict[str, str] = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}

#: The prefix we write for each component.
LOKR_PREFIX: dict[str, str] = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}

#: Module kinds, the vocabulary of presets and ``summary()``.
UNET_KINDS: tuple[str, ...] = (
    "attn",  # attn1/attn2 to_q, to_k, to_v, to_out.0 (Linear)
    "ff",  # ff.net.0.proj (GEGLU in), ff.net.2 (Linear)
    "proj",  # transformer proj_in / proj_out (Linear in SDXL)
    "resnet_conv",  # ResNet in_layers.2 / out_layers.3 (3x3 conv)
    "resnet_time",  # ResNet emb_layers.1 (Linear)
    "skip",  # ResNet skip_connection (1x1 conv)
    "downsample",  # input_blocks.N.0.op (3x3 conv, stride 2)
    "upsample",  # output_blocks.N.M.conv (3x3 conv)
    "conv_in",  # input_blocks.0.0 (3x3 conv, 4 -> 320)
    "conv_out",  # out.2 (3x3 conv, 320 -> 4)
    "time_embed",  # time_embed.0 / .2 (Linear)
    "label_emb",  # label_emb.0.0 / .0.2 (Linear, SDXL size/pooled-text embedding)
)
TE_KINDS: tuple[str, ...] = ("te_attn", "te_mlp")
KINDS: tuple[str, ...] = UNET_KINDS + TE_KINDS


@dataclass(frozen=True)
class ModuleEntry:
    """One LoKr-able module: where it lives and what it is."""

    component: str  # "unet" | "te1" | "te2"
    path: str  # canonical dotted path: LDM for the UNet, ``text_model.…`` for the TEs
    kind: str  # one of KINDS

    @property
    def lokr_name(self) -> str:
        return LOKR_PREFIX[self.component] + self.path.replace(".", "_")

    @property
    def dotted(self) -> str:
        """``unet.input_blocks.4.1…`` / ``te1.text_model.…``: the spelling glob patterns also see."""
        return f"{self.component}.{self.path}"


# --------------------------------------------------------------------------- the table


def _per_level(value: Any, levels: int) -> list[int]:
    if isinstance(value, int):
        return [value] * levels
    return [int(v) for v in value]


def _resnet(prefix: str, skip: bool) -> Iterator[tuple[str, str]]:
    yield f"{prefix}.in_layers.2", "resnet_conv"
    yield f"{prefix}.emb_layers.1", "resnet_time"
    yield f"{prefix}.out_layers.3", "resnet_conv"
    if skip:
        yield f"{prefix}.skip_connection", "skip"


def _transformer(prefix: str, depth: int) -> Iterator[tuple[str, str]]:
    yield f"{prefix}.proj_in", "proj"
    for k in range(depth):
        block = f"{prefix}.transformer_blocks.{k}"
        for attn in ("attn1", "attn2"):
            for leaf in ("to_q", "to_k", "to_v", "to_out.0"):
                yield f"{block}.{attn}.{leaf}", "attn"
        yield f"{block}.ff.net.0.proj", "ff"
        yield f"{block}.ff.net.2", "ff"
    yield f"{prefix}.proj_out", "proj"


def unet_module_paths(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every Linear/Conv of an SDXL-style UNet as (LDM path, kind), in LDM order.

    ``config`` is the diffusers ``UNet2DConditionModel`` config (a plain
    mapping; ``unet.config`` works).  Derived from the block structure SDXL's
    LDM numbering encodes, the same rules :mod:`lokr_trainer.sdxl.keys`
    converts with, so that it also describes the tiny test UNet.
    """
    channels = list(config["block_out_channels"])
    levels = len(channels)
    layout = UNetLayout.from_diffusers_config(config)
    lpb = layout.layers_per_block
    attn_levels = set(layout.attn_levels)
    depth = _per_level(config.get("transformer_layers_per_block", 1), levels)
    stride = lpb + 1
    out: list[tuple[str, str]] = []
    out.append(("time_embed.0", "time_embed"))
    out.append(("time_embed.2", "time_embed"))
    if config.get("addition_embed_type") == "text_time":
        out.append(("label_emb.0.0", "label_emb"))
        out.append(("label_emb.0.2", "label_emb"))
    out.append(("input_blocks.0.0", "conv_in"))
    prev = channels[0]
    for level in range(levels):
        for j in range(lpb):
            n = 1 + level * stride + j
            out.extend(_resnet(f"input_blocks.{n}.0", skip=prev != channels[level]))
            prev = channels[level]
            if level in attn_levels:
                out.extend(_transformer(f"input_blocks.{n}.1", depth[level]))
        if level < levels - 1:
            out.append((f"input_blocks.{(level + 1) * stride}.0.op", "downsample"))
    out.extend(_resnet("middle_block.0", skip=False))
    out.extend(_transformer("middle_block.1", depth[-1]))
    out.extend(_resnet("middle_block.2", skip=False))
    for up in range(levels):
        mirror = levels - 1 - up
        for j in range(stride):
            n = up * stride + j
            out.extend(_resnet(f"output_blocks.{n}.0", skip=True))  # the concatenated skip always widens
            if mirror in attn_levels:
                out.extend(_transformer(f"output_blocks.{n}.1", depth[mirror]))
            if j == lpb and up < levels - 1:
                out.append((f"output_blocks.{n}.{2 if mirror in attn_levels else 1}.conv", "upsample"))
    out.append(("out.2", "conv_out"))
    return out


def text_encoder_paths(num_layers: int) -> list[tuple[str, str]]:
    """q, k, v, out and fc1, fc2 of every CLIP encoder layer (canonical transformers-4 paths)."""
    out: list[tuple[str, str]] = []
    for i in range(num_layers):
        base = f"text_model.encoder.layers.{i}"
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out.append((f"{base}.self_attn.{p}", "te_attn"))
        out.append((f"{base}.mlp.fc1", "te_mlp"))
        out.append((f"{base}.mlp.fc2", "te_mlp"))
    return out


class ModuleTable:
    """The LoKr-able modules of one SDXL-shaped model, by name and by path."""

    def __init__(self, entries: Iterable[ModuleEntry], layout: UNetLayout = SDXL_UNET_LAYOUT) -> None:
        self.entries: tuple[ModuleEntry, ...] = tuple(entries)
        self.layout = layout
        self.by_name: dict[str, ModuleEntry] = {}
        for e in self.entries:
            if e.lokr_name in self.by_name:  # pragma: no cover - a table bug, not a user error
                raise KeyMapError(f"two modules share the LoKr name {e.lokr_name}")
            self.by_name[e.lokr_name] = e

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, lokr_name: str) -> bool:
        return lokr_name in self.by_name

    def __getitem__(self, lokr_name: str) -> ModuleEntry:
        return self.by_name[lokr_name]

    def component(self, component: str) -> list[ModuleEntry]:
        return [e for e in self.entries if e.component == component]

    @classmethod
    def from_configs(
        cls, unet_config: Mapping[str, Any], te1_layers: int, te2_layers: int
    ) -> "ModuleTable":
        """From the diffusers UNet config and the two encoders' layer counts."""
        layout = UNetLayout.from_diffusers_config(unet_config)
        entries = [ModuleEntry("unet", p, k) for p, k in unet_module_paths(unet_config)]
        entries += [ModuleEntry("te1", p, k) for p, k in text_encoder_paths(te1_layers)]
        entries += [ModuleEntry("te2", p, k) for p, k in text_encoder_paths(te2_layers)]
        return cls(entries, layout)

    @classmethod
    def from_models(cls, models: Any) -> "ModuleTable":
        """From live ``SDXLModels`` (or anything with unet/text_encoder/text_encoder_2)."""
        return cls.from_configs(
            dict(models.unet.config),
            int(models.text_encoder.config.num_hidden_layers),
            int(models.text_encoder_2.config.num_hidden_layers),
        )


@cache
def sdxl_module_table() -> ModuleTable:
    """The table of SDXL 1.0 base (UNet 2.6 B, CLIP-L 12 layers, bigG 32 layers)."""
    from lokr_trainer.sdxl.configs import SDXL_TEXT_ENCODER_2_CONFIG, SDXL_TEXT_ENCODER_CONFIG, SDXL_UNET_CONFIG

    return ModuleTable.from_configs(
        SDXL_UNET_CONFIG,
        SDXL_TEXT_ENCODER_CONFIG["num_hidden_layers"],
        SDXL_TEXT_ENCODER_2_CONFIG["num_hidden_layers"],
    )


# --------------------------------------------------------------------------- parsing names

#: Path segments that contain underscores, longest first; everything else is one token.
_COMPOUNDS: tuple[tuple[str, ...], ...] = tuple(
    sorted(
        (
            tuple(w.split("_"))
            for w in (
                # LDM UNet
                "input_blocks middle_block output_blocks transformer_blocks proj_in proj_out "
                "to_q to_k to_v to_out in_layers out_layers emb_layers skip_connection time_embed label_emb "
                # diffusers UNet
                "down_blocks up_blocks mid_block conv_in conv_out conv_shortcut time_emb_proj "
                "time_embedding add_embedding linear_1 linear_2 "
                # CLIP
                "text_model self_attn q_proj k_proj v_proj out_proj"
            ).split()
        ),
        key=len,
        reverse=True,
    )
)


def underscore_to_dotted(flat: str) -> str:
    """``input_blocks_4_1_transformer_blocks_0_attn1_to_q`` -> ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``.

    Greedy longest match of the known multi-word segments; every SDXL module
    path splits unambiguously this way.
    """
    tokens = flat.split("_")
    out: list[str] = []
    i = 0
    while i < len(tokens):
        for words in _COMPOUNDS:
            if tuple(tokens[i : i + len(words)]) == words:
                out.append("_".join(words))
                i += len(words)
                break
        else:
            out.append(tokens[i])
            i += 1
    return ".".join(out)


_LDM_MODULE = re.compile(
    r"^(?:"
    r"input_blocks\.0\.0"
    r"|(?:input_blocks\.\d+\.0|middle_block\.[02]|output_blocks\.\d+\.0)"
    r"\.(?:in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)"
    r"|input_blocks\.\d+\.0\.op"
    r"|output_blocks\.\d+\.[12]\.conv"
    r"|(?:input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)"
    r"\.(?:proj_in|proj_out|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))"
    r"|time_embed\.[02]|label_emb\.0\.[02]|out\.2"
    r")$"
)
_TE_MODULE = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")
_DIFFUSERS_HEADS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding", "add_embedding")

#: Prefixes we read, longest first -> (component, UNet spelling hint).
_READ_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_unet_", "unet"),
    ("lycoris_", "unet"),  # SimpleTuner / LyCORIS generic wrapper on a diffusers UNet
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te_", "te1"),  # a lone text encoder: CLIP-L (ComfyUI reads it so)
)


def adapter_component_of(name: str) -> str | None:
    """``unet``/``te1``/``te2`` from a module name's prefix in any spelling we read, else None."""
    for prefix, component in _READ_PREFIXES:
        if name.startswith(prefix):
            return component
    return None


def parse_lokr_name(
    name: str, layout: UNetLayout = SDXL_UNET_LAYOUT, table: ModuleTable | None = None
) -> tuple[str, str]:
    """Any LoKr module name other tools write -> (component, canonical dotted path).

    Accepts ``lora_unet_`` with LDM or diffusers paths, ``lycoris_`` (diffusers
    paths), ``lora_te1_``/``lora_te2_``/``lora_te_`` with or without the
    ``text_model`` level.  With ``table`` (default: the SDXL table when
    ``layout`` is SDXL's) the module must also exist in that model, which
    checks transformer depths and layer counts too.  Raises
    :class:`~lokr_trainer.errors.KeyMapError` naming the module otherwise.
    """
    for prefix, component in _READ_PREFIXES:
        if name.startswith(prefix):
            break
    else:
        raise KeyMapError(
            f"LoKr module {name!r}: unknown prefix (expected lora_unet_, lora_te1_, lora_te2_, lora_te_ or lycoris_)"
        )
    dotted = underscore_to_dotted(name[len(prefix) :])
    if component == "unet":
        try:
            if dotted.split(".")[0] in _DIFFUSERS_HEADS:
                path = unet_diffusers_to_ldm(dotted, layout)
            else:
                path = dotted
                unet_ldm_to_diffusers(path, layout)  # checks the block numbering against the layout
        except KeyMapError:
            raise KeyMapError(f"LoKr module {name!r} is not a module of an SDXL UNet ({dotted})") from None
        if not _LDM_MODULE.match(path):
            raise KeyMapError(f"LoKr module {name!r} is not a Linear/Conv of an SDXL UNet ({path})")
    else:
        path = dotted if dotted.startswith("text_model.") else "text_model." + dotted
        if not _TE_MODULE.match(path):
            raise KeyMapError(f"LoKr module {name!r} is not an attention/MLP Linear of a CLIP text encoder ({path})")
    if table is None and layout == SDXL_UNET_LAYOUT:
        table = sdxl_module_table()
    if table is not None and LOKR_PREFIX[component] + path.replace(".", "_") not in table:
        raise KeyMapError(f"LoKr module {name!r} ({component} {path}) does not exist in this model")
    return component, path


def normalize_lokr_name(
    name: str, layout: UNetLayout = SDXL_UNET_LAYOUT, table: ModuleTable | None = None
) -> str:
    """The canonical spelling we write: ``lora_unet_<LDM>``, ``lora_te1_text_model_…``."""
    component, path = parse_lokr_name(name, layout, table)
    return LOKR_PREFIX[component] + path.replace(".", "_")


def lokr_name_to_sdxl_key(
    name: str, layout: UNetLayout = SDXL_UNET_LAYOUT, table: ModuleTable | None = None
) -> tuple[str, int | None]:
    """LoKr module name -> (single-file weight key, q/k/v row index or None).

    ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`` ->
    ``("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", None)``;
    ``lora_te2_text_model_encoder_layers_31_self_attn_k_proj`` ->
    ``("conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight", 1)``
    (rows 1280..2559 of the stacked q/k/v weight).
    """
    component, path = parse_lokr_name(name, layout, table)
    if component == "unet":
        return PREFIXES["unet"] + path + ".weight", None
    if component == "te1":
        return PREFIXES["text_encoder"] + path + ".weight", None
    openclip, idx = hf_to_openclip(path)
    if idx is not None:  # module ``attn.in_proj`` -> tensor ``attn.in_proj_weight``
        return PREFIXES["text_encoder_2"] + openclip + "_weight", idx
    return PREFIXES["text_encoder_2"] + openclip + ".weight", None


def live_module_path(entry: ModuleEntry, model: Any, layout: UNetLayout = SDXL_UNET_LAYOUT) -> str:
    """The attribute path of ``entry`` inside the live diffusers/transformers module."""
    if entry.component == "unet":
        return unet_ldm_to_diffusers(entry.path, layout)
    from lokr_trainer.sdxl.keys import live_name

    return live_name(entry.path, model)


def group_te_attention(entries: Sequence[ModuleEntry]) -> dict[tuple[str, str], list[ModuleEntry]]:
    """TE attention entries grouped by (component, layer path): q, k, v, out belong together."""
    groups: dict[tuple[str, str], list[ModuleEntry]] = {}
    for e in entries:
        if e.kind == "te_attn":
            groups.setdefault((e.component, e.path.rsplit(".", 2)[0]), []).append(e)
    return groups
