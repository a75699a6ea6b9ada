"""``python -m lokr_trainer.config from-kohya``: a kohya sd-scripts + LyCORIS LoKr config as a run config.

Input: kohya's ``--config_file`` TOML (its command-line arguments as keys, flat or
grouped in sections, which kohya flattens), its ``--dataset_config`` TOML
(``[general]`` / ``[[datasets]]`` / ``[[datasets.subsets]]``, each level falling
back to the one above and then to the arguments) and the LyCORIS preset TOML
named by ``network_args = ["preset=..."]`` (or ``--lycoris-preset``).

Every key is accounted for: it is mapped to a ``lokr_trainer`` setting, or
listed by name as *unsupported* (it would change the run and has no
counterpart here) or *ignored* (off, at its default, or without effect here),
with a reason.  The list is printed and written as comments at the top of the
output, which is validated with :func:`~lokr_trainer.config.load_config`
before it is written atomically.

The LoKr selection is not guessed from names: LyCORIS' kohya wrapper walk
(target classes, target names, ``module_algo_map``, ``name_algo_map``,
``exclude_name``, ``enable_conv``, conv dims) is replayed over the SDXL module
table of kohya's own UNet and HF CLIP, giving the settings of every module;
the ``[lokr]`` table written is the shortest one (a named preset such as
``kohaku-xl-delta`` if one matches exactly) whose resolution is that same set.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import tomli_w

from lokr_trainer.config.run_config import read_toml
from lokr_trainer.errors import ConfigError, LokrTrainerError

__all__ = ["Conversion", "Finding", "convert", "convert_files", "flatten_args", "main"]

UNSUPPORTED, IGNORED, NOTE = "unsupported", "ignored", "note"


@dataclass(frozen=True)
class Finding:
    """One kohya key (or value) that was not carried over as it is, and why."""

    key: str
    value: Any
    status: str  # UNSUPPORTED | IGNORED | NOTE
    reason: str

    def line(self) -> str:
        shown = "" if self.value is _NO_VALUE else f" = {_show(self.value)}"
        return f"{self.key}{shown}: {self.reason}"


@dataclass
class Conversion:
    """The run config (TOML tables) and everything said about the conversion."""

    config: dict[str, dict[str, Any]]
    findings: list[Finding] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    batch_line: str = ""

    def keys(self, status: str) -> set[str]:
        return {f.key for f in self.findings if f.status == status}

    def report_lines(self) -> list[str]:
        out = list(self.sources)
        if self.batch_line:
            out.append(self.batch_line)
        for status, title in (
            (UNSUPPORTED, "Not converted (lokr_trainer has no such setting; the run differs if you relied on it):"),
            (IGNORED, "Ignored (off, at its default, or without effect here):"),
            (NOTE, "Notes (converted with a caveat):"),
        ):
            items = [f for f in self.findings if f.status == status]
            if items:
                out.append(title)
                out.extend(f"  {f.line()}" for f in items)
        return out

    def to_toml(self) -> str:
        head = "\n".join(f"# {line}" if line else "#" for line in self.report_lines())
        return head + "\n\n" + tomli_w.dumps(self.config)


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_NO_VALUE: Any = _Missing()


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


# ----------------------------------------------------------------------------- reading kohya files




def flatten_args(doc: Mapping[str, Any]) -> dict[str, Any]:
    """kohya's ``--config_file``: top-level keys, plus the keys of each section, one level deep."""
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}
    for key, value in doc.items():
        items = value.items() if isinstance(value, Mapping) else [(key, value)]
        section = f"[{key}]" if isinstance(value, Mapping) else "the top level"
        for k, v in items:
            if k in flat and flat[k] != v:
                raise ConfigError(
                    f"{k} is set twice with different values ({_show(flat[k])} in {where[k]}, {_show(v)} in "
                    f"{section}); kohya would silently keep one of them: keep one"
                )
            flat[k], where[k] = v, section
    return flat


class _Table:
    """A kohya table whose keys are marked as they are read, so that none is dropped silently."""

    def __init__(self, data: Mapping[str, Any], label: str) -> None:
        self.data = dict(data)
        self.label = label
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.data

    def take(self, key: str, default: Any = None) -> Any:
        if key in self.data:
            self.used.add(key)
            return self.data[key]
        return default

    def name(self, key: str) -> str:
        return f"{self.label}.{key}" if self.label else key

    def unused(self) -> list[tuple[str, Any]]:
        return [(k, v) for k, v in self.data.items() if k not in self.used]


class _Chain:
    """Dataset-config lookups: subset, then dataset, then [general], then the arguments."""

    def __init__(self, *tables: _Table) -> None:
        self.tables = tables

    def find(self, key: str) -> tuple[Any, _Table | None]:
        for t in self.tables:
            if t.has(key):
                return t.take(key), t
        return None, None

    def take(self, key: str, default: Any = None) -> Any:
        value, table = self.find(key)
        return default if table is None else value

    def where(self, key: str) -> str:
        for t in self.tables:
            if t.has(key):
                return t.name(key)
        return key


# ----------------------------------------------------------------------------- value checks


def _want(name: str, value: Any, kinds: tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"{name} = {_show(value)}: expected {what}")
    if not isinstance(value, kinds):
        raise ConfigError(f"{name} = {_show(value)}: expected {what}")
    return value


def _int(name: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return _want(name, value, (int,), "an integer")


def _float(name: str, value: Any) -> float:
    v = _want(name, value, (int, float), "a number")
    if not math.isfinite(v):
        raise ConfigError(f"{name} = {value!r}: expected a finite number")
    return float(v)


def _bool(name: str, value: Any) -> bool:
    return _want(name, value, (bool,), "true or false")


def _str(name: str, value: Any) -> str:
    return _want(name, value, (str,), "a string")


def _str_bool(value: Any) -> bool:
    """LyCORIS' reading of a ``network_args`` flag: anything but "false" is true."""
    return str(value).lower() != "false"


def _kv_list(name: str, value: Any) -> dict[str, str]:
    """``["k=v", ...]`` (``network_args`` / ``optimizer_args``), split at the first ``=``, as kohya does."""
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f'{name} = {_show(value)}: expected a list of "key=value" strings')
    out: dict[str, str] = {}
    for item in value:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f'{name} contains {_show(item)}: expected "key=value" strings')
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


# ----------------------------------------------------------------------------- keys we do not map

_HARMLESS: dict[str, str] = {}
for _keys, _why in (
    ("xformers sdpa mem_eff_attn", "attention always runs through PyTorch SDPA"),
    ("lowram highvram disable_mmap_load_safetensors vae_batch_size skip_cache_check", "a loading/caching detail"),
    ("persistent_data_loader_workers", "a DataLoader detail; results do not depend on it"),
    ("logging_dir log_with log_prefix log_tracker_name log_tracker_config log_config wandb_run_name wandb_api_key",
     "TensorBoard logs go to <output_dir>/logs"),
    ("console_log_level console_log_file console_log_simple", "a logging detail"),
    ("training_comment no_metadata metadata_title metadata_author metadata_description metadata_license "
     "metadata_tags output_config", "file metadata only; ours is always written"),
    ("save_state save_state_on_train_end", "training states are always written (train.save_every, at the end)"),
    ("ddp_timeout ddp_gradient_as_bucket_view ddp_static_graph", "a DDP detail accelerate handles"),
    ("tokenizer_cache_dir", "tokenizers are built offline, never downloaded"),
    ("clip_skip", "kohya ignores it for SDXL too"),
    ("cache_latents_to_disk", "the latent cache always lives on disk (data.cache_dir)"),
    ("cache_text_encoder_outputs_to_disk", "the text-encoder cache always lives on disk"),
    ("sdxl", "the converter always writes an SDXL run"),
):
    for _k in _keys.split():
        _HARMLESS[_k] = _why

#: kohya keys without a counterpart: the reason, and the values that mean "off".
_UNSUPPORTED: dict[str, tuple[str, tuple[Any, ...]]] = {}
for _keys, _why, _off in (
    ("vae", "the VAE always comes from the model file", ()),
    ("v2 v_pred_like_loss scale_v_pred_loss_like_noise_pred", "SD2 / v-prediction loss rescaling is not implemented", ()),
    ("noise_offset_random_strength ip_noise_gamma_random_strength adaptive_noise_scale",
     "random/adaptive noise strengths are not implemented", ()),
    ("loss_type", "only the L2 (MSE) loss is implemented", ("l2",)),
    ("huber_c huber_schedule huber_scale", "Huber losses are not implemented",
     (0.1, "snr", 1.0)),
    ("masked_loss alpha_mask", "masked loss is not implemented", ()),
    ("weighted_captions", "A1111-style caption weights are not implemented", ()),
    ("prior_loss_weight", "regularisation images are not supported", (1.0, 1)),
    ("reg_data_dir", "regularisation images are not supported", ()),
    ("in_json dataset_repeats", "kohya fine-tuning metadata JSON is not read; use sidecars or a .jsonl manifest", ()),
    ("dim_from_weights", "model.init_lokr needs the [lokr] table to match the file; shapes are not read from it", (False,)),
    ("base_weights base_weights_multiplier", "merge the weights into the base first (python -m lokr_trainer.merge)", ()),
    ("scale_weight_norms", "max-norm regularisation is not implemented", ()),
    ("network_dropout", "lycoris.kohya ignores it (LyCORIS reads network_args dropout)", ()),
    ("network_multiplier", "the training multiplier is lokr.multiplier", (1.0, 1)),
    ("sample_prompts sample_every_n_steps sample_every_n_epochs sample_at_first sample_sampler",
     "previews are configured in [sample] (prompts, every, steps, cfg)", ()),
    ("resume resume_from_huggingface", "use `python -m lokr_trainer.train ... --resume latest`", ()),
    ("initial_step initial_epoch skip_until_initial_step", "resume continues exactly; no manual offsets", ()),
    ("save_every_n_epochs save_last_n_epochs save_last_n_epochs_state save_n_epoch_ratio",
     "saves are counted in optimizer steps (train.save_every)", ()),
    ("save_model_as", "adapters are always .safetensors", ("safetensors",)),
    ("validate_every_n_steps validate_every_n_epochs max_validation_steps validation_split validation_seed",
     "validation uses a separate held-out source ([validation] path)", ()),
    ("fused_backward_pass", "only for full fine-tuning with Adafactor", ()),
    ("torch_compile dynamo_backend", "torch.compile is not wired in", ("no", "NO")),
    ("full_fp16 full_bf16", "adapters always train in fp32 (with autocast)", ()),
    ("fp8_base fp8_base_unet", "an fp8 base is not supported", ()),
    ("cpu_offload_checkpointing", "not implemented", ()),
    ("lr_scheduler_type lr_scheduler_args lr_decay_steps", "custom schedulers are not supported", ()),
    ("lr_scheduler_num_cycles", "only used by cosine_with_restarts, which is not supported", (1,)),
    ("lr_scheduler_power", "only used by polynomial, which is not supported", (1.0, 1)),
    ("lr_scheduler_timescale", "only used by inverse_sqrt, which is not supported", ()),
    ("huggingface_repo_id huggingface_repo_type huggingface_path_in_repo huggingface_token huggingface_repo_visibility "
     "save_state_to_huggingface async_upload", "no uploads", ()),
    ("deepspeed zero_stage offload_optimizer_device offload_param_device zero3_init_flag zero3_save_16bit_model",
     "DeepSpeed is configured through accelerate, not the run config", ()),
    ("color_aug face_crop_aug_range", "colour / face-crop augmentation is not implemented", ()),
    ("bucket_no_upscale", "buckets always come from the fixed bucket set", ()),
    ("caption_prefix caption_suffix secondary_separator enable_wildcard token_warmup_step",
     "this caption operation is not implemented", ()),
    ("token_warmup_min", "token warmup is not implemented", (1,)),
    ("caption_dropout_every_n_epochs", "epoch-wise caption dropout is not implemented", ()),
    ("class_tokens", "captions come from sidecar files; add them there", ()),
    ("cache_info", "the cache index is our own", ()),
    ("custom_attributes conditioning_data_dir", "not supported", ()),
    ("resize_interpolation", "images are resized with Lanczos", ("lanczos",)),
    ("debug_dataset", "use `python -m lokr_trainer.data` to inspect a dataset", ()),
    ("loraplus_lr_ratio loraplus_unet_lr_ratio loraplus_text_encoder_lr_ratio",
     "LoRA+ is not implemented (lycoris.kohya applies it to lora_up only, so not to LoKr)", ()),
    ("use_8bit_adam use_lion_optimizer", "read together with optimizer_type", ()),
):
    for _k in _keys.split():
        _UNSUPPORTED[_k] = (_why, _off)

_OFF: tuple[Any, ...] = (None, False, 0, 0.0, "", [], {})


def _classify(key: str, label: str, value: Any) -> Finding:
    name = f"{label}.{key}" if label else key
    if key in _HARMLESS:
        return Finding(name, value, IGNORED, _HARMLESS[key])
    why, off = _UNSUPPORTED.get(key, ("not a setting lokr_trainer has (or not a kohya key)", ()))
    if _is_off(value, off):
        return Finding(name, value, IGNORED, f"off / kohya's default ({why})")
    return Finding(name, value, UNSUPPORTED, why)


def _is_off(value: Any, off: tuple[Any, ...]) -> bool:
    """Whether ``value`` means "off" (false, zero, empty) or is one of the key's default values."""
    def same(x: Any, y: Any) -> bool:
        if isinstance(x, bool) or isinstance(y, bool):
            return type(x) is type(y) and x == y
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            return x == y
        return type(x) is type(y) and x == y

    return any(same(value, o) for o in _OFF + off)


# ----------------------------------------------------------------------------- LyCORIS presets

_CLIP_ATTN = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2")
_FULL_UNET = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
_FULL_TE = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]

#: LyCORIS' builtin presets, reduced to the class and module names that exist in an SDXL
#: UNet (kohya's) or CLIP; the others never match.  The diffusers names (conv_in, ...)
#: are kept: on kohya's LDM-named UNet they match nothing, as in LyCORIS.
_BUILTIN_PRESETS: dict[str, dict[str, Any]] = {
    "full": {"enable_conv": True, "unet_target_module": _FULL_UNET,
             "unet_target_name": ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"],
             "text_encoder_target_module": _FULL_TE, "text_encoder_target_name": []},
    "full-lin": {"enable_conv": False, "unet_target_module": ["Transformer2DModel", "ResnetBlock2D"],
                 "unet_target_name": ["time_embedding.linear_1", "time_embedding.linear_2"],
                 "text_encoder_target_module": _FULL_TE, "text_encoder_target_name": []},
    "attn-mlp": {"enable_conv": False, "unet_target_module": ["Transformer2DModel"], "unet_target_name": [],
                 "text_encoder_target_module": _FULL_TE, "text_encoder_target_name": []},
    "attn-only": {"enable_conv": False, "unet_target_module": ["CrossAttention", "SelfAttention"],
                  "unet_target_name": [], "text_encoder_target_module": ["CLIPAttention", "CLIPSdpaAttention"],
                  "text_encoder_target_name": []},
    "unet-only": {"enable_conv": True, "unet_target_module": _FULL_UNET,
                  "unet_target_name": ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"],
                  "text_encoder_target_module": [], "text_encoder_target_name": []},
    "unet-transformer-only": {"enable_conv": False, "unet_target_module": ["Transformer2DModel"],
                              "unet_target_name": [], "text_encoder_target_module": [],
                              "text_encoder_target_name": []},
    "unet-convblock-only": {"enable_conv": True, "unet_target_module": ["ResnetBlock2D", "Downsample2D", "Upsample2D"],
                            "unet_target_name": ["conv_in", "conv_out"], "text_encoder_target_module": [],
                            "text_encoder_target_name": []},
}

_PRESET_KEYS = (
    "enable_conv", "unet_target_module", "unet_target_name", "text_encoder_target_module",
    "text_encoder_target_name", "module_algo_map", "name_algo_map", "use_fnmatch", "exclude_name",
)
_PRESET_IGNORED = {"target_module", "target_name", "lora_prefix"}  # generic-wrapper keys lycoris.kohya ignores

#: Per-module option names LyCORIS accepts in module_algo_map/name_algo_map, and ours.
_MODULE_OPTIONS = {
    "factor": "factor", "dim": "dim", "alpha": "alpha", "full_matrix": "full_matrix",
    "use_tucker": "use_tucker", "decompose_both": "decompose_both", "weight_decompose": "weight_decompose",
    "unbalanced_factorization": "unbalanced_factorization",
}

_CONV3_KINDS = frozenset({"resnet_conv", "downsample", "upsample", "conv_in", "conv_out"})
_CONV_KINDS = _CONV3_KINDS | {"skip"}
#: A network_dim at least this large makes both Kronecker factors dense on every SDXL layer
#: at any factor (the largest LoKr w2 side is 10240: LyCORIS goes full when dim >= side / 2).
_ALWAYS_FULL_DIM = 5120


@dataclass
class _Preset:
    enable_conv: bool
    unet_modules: list[str]
    unet_names: list[str]
    te_modules: list[str]
    te_names: list[str]
    module_map: dict[str, dict[str, Any]]
    name_map: dict[str, dict[str, Any]]
    use_fnmatch: bool
    exclude: list[str]
    label: str

    def match(self, pattern: str, name: str) -> bool:
        import fnmatch

        if self.use_fnmatch:
            return fnmatch.fnmatch(name, pattern)
        try:
            return re.match(pattern, name) is not None
        except re.error as e:
            raise ConfigError(f"{self.label}: {pattern!r} is not a valid regular expression ({e})") from None

    def hit(self, names: Sequence[str], name: str) -> bool:
        return name in names or any(self.match(t, name) for t in names)

    def excluded(self, name: str) -> bool:
        return bool(name) and self.hit(self.exclude, name)

    def name_conf(self, name: str) -> dict[str, Any] | None:
        if name in self.name_map:
            return self.name_map[name]
        for key, value in self.name_map.items():
            if self.match(key, name):
                return value
        return None


def _preset_from(doc: Mapping[str, Any], label: str, findings: list[Finding]) -> _Preset:
    base = _BUILTIN_PRESETS["full"]  # lycoris.kohya's class defaults are the full preset
    for k, v in doc.items():
        if k in _PRESET_IGNORED:
            findings.append(Finding(f"{label}.{k}", v, IGNORED, "a key of LyCORIS' generic wrapper; lycoris.kohya ignores it"))
        elif k not in _PRESET_KEYS:
            raise ConfigError(
                f"{label}: unknown LyCORIS preset key {k!r} (LyCORIS refuses it too); known: {', '.join(_PRESET_KEYS)}"
            )

    def strings(key: str) -> list[str]:
        value = doc.get(key, base.get(key, []))
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise ConfigError(f"{label}.{key} = {value!r}: expected a list of strings")
        return value

    def table(key: str) -> dict[str, dict[str, Any]]:
        value = doc.get(key, {})
        if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
            raise ConfigError(f"{label}.{key} must be a table of tables ([{key}.<name>] with algo, factor, ...)")
        return {str(k): dict(v) for k, v in value.items()}

    for key in ("module_algo_map", "name_algo_map"):
        for name in table(key):
            if "\\" in name:
                findings.append(Finding(f"{label}.{key}", name, NOTE, "LyCORIS reads presets with the `toml` package, "
                                        "which keeps the backslashes of quoted keys doubled, so in LyCORIS this key "
                                        "may match other modules than here; write it without backslash escapes"))
    enable_conv = doc.get("enable_conv", base["enable_conv"])
    use_fnmatch = doc.get("use_fnmatch", False)
    for key, v in (("enable_conv", enable_conv), ("use_fnmatch", use_fnmatch)):
        _bool(f"{label}.{key}", v)
    return _Preset(
        enable_conv=enable_conv,
        unet_modules=strings("unet_target_module"),
        unet_names=strings("unet_target_name"),
        te_modules=strings("text_encoder_target_module"),
        te_names=strings("text_encoder_target_name"),
        module_map=table("module_algo_map"),
        name_map=table("name_algo_map"),
        use_fnmatch=use_fnmatch,
        exclude=strings("exclude_name") if "exclude_name" in doc else [],
        label=label,
    )


def _chain_of(entry: Any) -> list[tuple[str, tuple[str, ...]]]:
    """``(module path, class names)`` from the root to the leaf, as LyCORIS walks kohya's UNet / HF CLIP."""
    path, kind = entry.path, entry.kind
    parts = path.split(".")
    if entry.component != "unet":
        root = "CLIPTextModel" if entry.component == "te1" else "CLIPTextModelWithProjection"
        layer = ".".join(parts[:4])  # text_model.encoder.layers.N
        chain = [("", (root,)), ("text_model", ("CLIPTextTransformer",)), ("text_model.encoder", ("CLIPEncoder",)),
                 (layer, ("CLIPEncoderLayer",))]
        chain.append((f"{layer}.self_attn", _CLIP_ATTN) if kind == "te_attn" else (f"{layer}.mlp", ("CLIPMLP",)))
        return chain + [(path, ("Linear",))]
    chain = [("", ("SdxlUNet2DConditionModel",))]
    if kind in ("attn", "ff", "proj"):
        head = 2 if parts[0] == "middle_block" else 3
        block = ".".join(parts[:head])
        chain.append((block, ("Transformer2DModel",)))
        if kind != "proj":
            tb = ".".join(parts[: head + 2])
            chain.append((tb, ("BasicTransformerBlock",)))
            sub = ".".join(parts[: head + 3])
            chain.append((sub, ("CrossAttention",) if kind == "attn" else ("FeedForward",)))
            if path.endswith("ff.net.0.proj"):
                chain.append((f"{sub}.net.0", ("GEGLU",)))
    elif kind in ("resnet_conv", "resnet_time", "skip"):
        cut = next(i for i, p in enumerate(parts) if p in ("in_layers", "out_layers", "emb_layers", "skip_connection"))
        chain.append((".".join(parts[:cut]), ("ResnetBlock2D",)))
    elif kind == "downsample":
        chain.append((".".join(parts[:-1]), ("Downsample2D",)))
    elif kind == "upsample":
        chain.append((".".join(parts[:-1]), ("Upsample2D",)))
    return chain + [(path, ("Conv2d",) if kind in _CONV_KINDS else ("Linear",))]


@dataclass(frozen=True)
class _Root:
    """lycoris.kohya's network-wide LoKr settings (from network_dim/alpha and network_args)."""

    dim: int
    alpha: float
    conv_dim: int
    conv_alpha: float
    factor: int
    full_matrix: bool
    use_tucker: bool
    decompose_both: bool
    weight_decompose: bool
    unbalanced_factorization: bool


_SETTING_NAMES = ("factor", "full_matrix", "dim", "alpha", "decompose_both", "use_tucker", "weight_decompose",
                  "unbalanced_factorization")


def _norm(s: Mapping[str, Any]) -> tuple:
    """Settings as a comparable tuple; dim/alpha/decompose_both do not matter when both factors are dense."""
    full = bool(s["full_matrix"])
    return (
        int(s["factor"]),
        full,
        None if full else int(s["dim"]),
        None if full else float(s["alpha"]),
        None if full else bool(s["decompose_both"]),
        bool(s["use_tucker"]),
        bool(s["weight_decompose"]),
        bool(s["unbalanced_factorization"]),
    )


def _lycoris_target(table: Any, preset: _Preset, root: _Root, components: Sequence[str],
                    findings: list[Finding]) -> dict[str, tuple | None]:
    """Replay lycoris.kohya's module walk: every SDXL module's settings, or None when not wrapped."""
    out: dict[str, tuple | None] = {}
    reported: set[str] = set()
    conv_dim = root.conv_dim if preset.enable_conv else 0
    for entry in table.entries:
        out[entry.lokr_name] = None
        if entry.component not in components:
            continue
        unet = entry.component == "unet"
        modules = preset.unet_modules if unet else preset.te_modules
        names = preset.unet_names if unet else preset.te_names
        chain = _chain_of(entry)
        leaf = chain[-1][0]
        if preset.excluded(leaf):
            continue
        conf: dict[str, Any] | None = None
        if preset.hit(names, leaf):  # LyCORIS' name branch (it wins over an enclosing target class here)
            conf = preset.name_conf(leaf)
            if conf is None:
                conf = next((preset.module_map[c] for c in chain[-1][1] if c in preset.module_map), {})
        else:
            top = next(
                (i for i, (n, classes) in enumerate(chain)
                 if any(c in modules for c in classes) and not preset.hit(names, n) and not preset.excluded(n)),
                None,
            )
            if top is None:
                continue
            conf = next((preset.module_map[c] for c in chain[top][1] if c in preset.module_map), {})
            for n, classes in chain[top + 1:]:
                mapped = next((preset.module_map[c] for c in classes if c in preset.module_map), None)
                if mapped is not None and not preset.excluded(n):
                    conf = mapped
        algo = str(conf.get("algo", "lokr")).lower()
        if algo != "lokr":
            raise ConfigError(
                f"{preset.label} gives algo = {algo!r} to {entry.lokr_name}: lokr_trainer trains LoKr only "
                "(set algo = \"lokr\" or remove that override)"
            )
        for k, v in conf.items():
            if k != "algo" and k not in _MODULE_OPTIONS and k not in reported:
                reported.add(k)
                findings.append(Finding(f"{preset.label} override option {k}", v, UNSUPPORTED,
                                        "a per-module LyCORIS option lokr_trainer has no counterpart for"))
        dim, alpha = conf.get("dim"), conf.get("alpha")
        if entry.kind in _CONV3_KINDS:
            if not (conv_dim > 0 or dim):
                continue
            dim = dim or conv_dim
            alpha = alpha or root.conv_alpha or dim  # LoKr takes alpha 0 as alpha = dim
        else:
            if root.dim <= 0:
                continue
            dim = dim or root.dim
            alpha = alpha or root.alpha or dim
        s = {
            "factor": int(conf.get("factor", root.factor)),
            "full_matrix": _str_bool(conf["full_matrix"]) if "full_matrix" in conf else root.full_matrix,
            "dim": int(dim),
            "alpha": float(alpha),
            "decompose_both": _str_bool(conf["decompose_both"]) if "decompose_both" in conf else root.decompose_both,
            "use_tucker": _str_bool(conf["use_tucker"]) if "use_tucker" in conf else root.use_tucker,
            "weight_decompose": (_str_bool(conf["weight_decompose"]) if "weight_decompose" in conf
                                 else root.weight_decompose),
            "unbalanced_factorization": (_str_bool(conf["unbalanced_factorization"])
                                         if "unbalanced_factorization" in conf else root.unbalanced_factorization),
        }
        if not s["full_matrix"] and s["dim"] >= _ALWAYS_FULL_DIM:
            s["full_matrix"] = True  # LyCORIS' own fallback: every factor is dense at this dim
        out[entry.lokr_name] = _norm(s)
    return out


def _resolved(cfg: Any, table: Any) -> dict[str, tuple | None]:
    got: dict[str, tuple | None] = {e.lokr_name: None for e in table.entries}
    for entry, s in cfg.resolve(table):
        got[entry.lokr_name] = _norm({k: getattr(s, k) for k in _SETTING_NAMES})
    return got


def _settings_dict(t: tuple) -> dict[str, Any]:
    factor, full, dim, alpha, both, tucker, wd, unbal = t
    d: dict[str, Any] = {"factor": factor, "full_matrix": full}
    if not full:
        d.update(dim=dim, alpha=alpha, decompose_both=both)
    d.update(use_tucker=tucker, weight_decompose=wd, unbalanced_factorization=unbal)
    return d


def _synthesise_lokr(target: Mapping[str, tuple | None], table: Any) -> dict[str, Any]:
    """A ``[lokr]`` table (a target set + first-match rules) whose resolution is ``target``."""
    selected = [t for t in target.values() if t is not None]
    comps = [c for c in ("unet", "te1", "te2") if any(target[e.lokr_name] for e in table.component(c))]
    default = Counter(selected).most_common(1)[0][0]
    base = _settings_dict(default)
    groups: dict[tuple[str, str], set] = {}
    for e in table.entries:
        if e.component in comps:
            groups.setdefault((e.component, e.kind), set()).add(target[e.lokr_name])
    from lokr_trainer.lokr.names import KINDS
    from lokr_trainer.lokr.targets import TARGET_PRESETS

    for target_name in ("attn", "attn-mlp", "full"):  # the smallest target set that leaves out only unselected kinds
        kinds_in = TARGET_PRESETS[target_name]
        if all(values == {None} for (_, kind), values in groups.items() if kind not in kinds_in):
            break
    groups = {ck: values for ck, values in groups.items() if ck[1] in kinds_in}
    rules: list[dict[str, Any]] = []
    exact: list[tuple[str, tuple | None]] = []  # modules whose group is mixed
    by_value: dict[tuple | None, dict[str, list[str]]] = {}
    for (comp, kind), values in groups.items():
        if len(values) == 1:
            (value,) = values
            if value != default:
                by_value.setdefault(value, {}).setdefault(kind, []).append(comp)
        else:
            for e in table.entries:
                if e.component == comp and e.kind == kind and target[e.lokr_name] != default:
                    exact.append((e.lokr_name, target[e.lokr_name]))
    patterns: dict[tuple | None, list[str]] = {}
    for name, value in exact:
        patterns.setdefault(value, []).append(name)
    ordered = sorted(patterns.items(), key=lambda kv: kv[0] is not None)  # skips first
    for value, names in ordered:
        rules.append({"pattern": names, **({"skip": True} if value is None else _rule_fields(value, base))})
    for value, kinds in sorted(by_value.items(), key=lambda kv: kv[0] is not None):
        by_comps: dict[tuple[str, ...], list[str]] = {}
        for kind in sorted(kinds, key=KINDS.index):
            by_comps.setdefault(tuple(sorted(kinds[kind], key=comps.index)), []).append(kind)
        for cs, ks in by_comps.items():
            rule: dict[str, Any] = {"kind": ks}
            having = {c for (c, k) in groups if k in ks}  # components that have these kinds at all
            if set(cs) != having:
                rule["component"] = list(cs)
            rule.update({"skip": True} if value is None else _rule_fields(value, base))
            rules.append(rule)
    out: dict[str, Any] = {"components": comps, "targets": target_name, **base}
    if rules:
        out["rules"] = rules
    return out


def _rule_fields(value: tuple, base: Mapping[str, Any]) -> dict[str, Any]:
    d = _settings_dict(value)
    return {k: v for k, v in d.items() if base.get(k) != v}


def _choose_lokr(target: Mapping[str, tuple | None], extra: Mapping[str, Any], table: Any) -> dict[str, Any]:
    """Our named preset when it selects exactly the same modules and settings, else an explicit table."""
    from lokr_trainer.lokr.targets import PRESETS, LoKrConfig

    comps = [c for c in ("unet", "te1", "te2") if any(target[e.lokr_name] for e in table.component(c))]
    if not comps:
        raise ConfigError(
            "the kohya/LyCORIS settings select no module to train (check the preset's target modules/names, "
            "enable_conv, network_dim and network_train_*_only)"
        )
    names = ["kohaku-xl-delta"] + [p for p in PRESETS if p != "kohaku-xl-delta"]
    for name in names:
        overrides = {} if comps == list(PRESETS[name].get("components", ("unet", "te1", "te2"))) else {"components": comps}
        try:
            cfg = LoKrConfig.from_preset(name, **overrides)
            if _resolved(cfg, table) == dict(target):
                return {"preset": name, **overrides, **extra}
        except ConfigError:
            continue
    table_dict = _synthesise_lokr(target, table)
    try:
        cfg = LoKrConfig.from_dict(table_dict)
        got = _resolved(cfg, table)
    except ConfigError as e:
        raise ConfigError(f"the LyCORIS selection cannot be expressed as a [lokr] table: {e}") from None
    if got != dict(target):  # pragma: no cover - a converter bug, never a user error
        diff = sorted(k for k in target if target[k] != got[k])
        raise ConfigError(f"internal: the [lokr] table written would select other modules ({diff[:3]} ...)")
    return {**table_dict, **extra}


# ----------------------------------------------------------------------------- the conversion


@dataclass
class _Ctx:
    findings: list[Finding]
    tables: list[_Table]

    def note(self, key: str, value: Any, reason: str) -> None:
        self.findings.append(Finding(key, value, NOTE, reason))

    def unsupported(self, key: str, value: Any, reason: str) -> None:
        self.findings.append(Finding(key, value, UNSUPPORTED, reason))

    def ignored(self, key: str, value: Any, reason: str) -> None:
        self.findings.append(Finding(key, value, IGNORED, reason))


_OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "lion8bit": "lion8bit", "lion": "lion",
               "pagedadamw8bit": "adamw8bit", "pagedlion8bit": "lion8bit"}
#: Library defaults of each optimizer (torch AdamW, bitsandbytes, lion-pytorch): what kohya gets without optimizer_args.
_OPT_DEFAULTS = {"adamw": ([0.9, 0.999], 0.01), "adamw8bit": ([0.9, 0.999], 0.01),
                 "lion8bit": ([0.9, 0.99], 0.0), "lion": ([0.9, 0.99], 0.0)}
_SCHEDULERS = {"constant": "constant", "constant_with_warmup": "constant_with_warmup", "cosine": "cosine",
               "cosine_with_min_lr": "cosine"}
_KOHYA_LR = 2e-6  # sd-scripts' --learning_rate default
_KOHYA_STEPS = 1600  # sd-scripts' --max_train_steps default
_PRECISION = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}
_SAVE_DTYPE = {"fp16": "fp16", "bf16": "bf16", "float": "fp32", "fp32": "fp32", None: "fp32"}


def convert(
    args: Mapping[str, Any],
    *,
    dataset: Mapping[str, Any] | None = None,
    preset: Mapping[str, Any] | None = None,
    preset_label: str = "",
    num_processes: int = 1,
) -> Conversion:
    """Map flattened kohya arguments (+ dataset config, + LyCORIS preset) to our run config."""
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ConfigError(f"--num-processes must be a positive integer, got {num_processes!r}")
    a = _Table(args, "")
    ctx = _Ctx([], [a])
    cfg: dict[str, dict[str, Any]] = {t: {} for t in ("model", "lokr", "data", "caption", "diffusion", "optimizer",
                                                         "scheduler", "train")}
    a.take("config_file")
    a.take("dataset_config")
    a.take("sdxl")

    _convert_model(a, ctx, cfg)
    unet_only, te_only = _convert_components(a, ctx, cfg)
    lokr_extra, root, net_label = _convert_network(a, ctx)
    _convert_lokr(ctx, cfg, preset, preset_label, net_label, root, unet_only, te_only, lokr_extra)
    data_info = _convert_data(a, ctx, cfg, dataset)
    _convert_diffusion(a, ctx, cfg)
    _convert_optimizer(a, ctx, cfg, unet_only, te_only)
    steps = _convert_length(a, ctx, cfg, data_info)
    _convert_scheduler(a, ctx, cfg, steps)
    batch_line = _convert_train(a, ctx, cfg, data_info, num_processes)

    for t in ctx.tables:
        for k, v in t.unused():
            ctx.findings.append(_classify(k, t.label, v))
    order = {UNSUPPORTED: 0, IGNORED: 1, NOTE: 2}
    findings = sorted(ctx.findings, key=lambda f: order[f.status])
    return Conversion({k: v for k, v in cfg.items() if v}, findings, [], batch_line)


def _convert_model(a: _Table, ctx: _Ctx, cfg: dict) -> None:
    path = a.take("pretrained_model_name_or_path")
    if path is None:
        raise ConfigError("pretrained_model_name_or_path is missing: kohya needs the SDXL base, and so does model.path")
    cfg["model"]["path"] = _str("pretrained_model_name_or_path", path)
    weights = a.take("network_weights")
    if weights not in (None, ""):
        cfg["model"]["init_lokr"] = _str("network_weights", weights)
        ctx.note("network_weights", weights, "written as model.init_lokr: the adapters start from this LoKr file, "
                 "whose modules must match the [lokr] selection")
    mp = a.take("mixed_precision", "no")
    if mp not in _PRECISION:
        raise ConfigError(f'mixed_precision = {_show(mp)}: expected "no", "fp16" or "bf16"')
    cfg["train"]["mixed_precision"] = mp
    cfg["model"]["dtype"] = _PRECISION[mp]  # kohya casts the frozen UNet/TEs to the mixed-precision dtype
    no_half_vae = _bool("no_half_vae", a.take("no_half_vae", False))
    cfg["model"]["vae_dtype"] = "fp32" if no_half_vae or mp == "no" else _PRECISION[mp]
    if not no_half_vae and mp != "no":
        ctx.note("no_half_vae", False, f"kohya runs the VAE in {mp}: written as model.vae_dtype = {mp!r}; SDXL's VAE "
                 "overflows in fp16, so consider fp32")


def _convert_components(a: _Table, ctx: _Ctx, cfg: dict) -> tuple[bool, bool]:
    unet_only = _bool("network_train_unet_only", a.take("network_train_unet_only", False))
    te_only = _bool("network_train_text_encoder_only", a.take("network_train_text_encoder_only", False))
    if unet_only and te_only:
        raise ConfigError("network_train_unet_only and network_train_text_encoder_only are both true: nothing to train")
    cfg["train"]["train_text_encoders"] = not unet_only
    if te_only:
        ctx.note("network_train_text_encoder_only", True, "written as lokr.components = te1, te2 (no UNet adapters)")
    return unet_only, te_only


def _convert_network(a: _Table, ctx: _Ctx) -> tuple[dict[str, Any], _Root, str]:
    module = a.take("network_module")
    hint = 'network_module = "lycoris.kohya" with network_args = ["algo=lokr", ...]'
    if module is None:
        raise ConfigError(f"network_module is missing: lokr_trainer trains LyCORIS LoKr only ({hint})")
    if module != "lycoris.kohya":
        raise ConfigError(f"network_module = {_show(module)}: lokr_trainer trains LyCORIS LoKr only ({hint})")
    nargs = _Table(_kv_list("network_args", a.take("network_args", [])), "network_args")
    ctx.tables.append(nargs)
    algo = nargs.take("algo", "lora").lower()
    if algo != "lokr":
        raise ConfigError(f"network_args algo = {algo!r}: lokr_trainer trains LoKr only (network_args \"algo=lokr\")")
    dim = a.take("network_dim")
    dim = 4 if dim is None else _int("network_dim", dim)  # lycoris.kohya's default
    alpha = _float("network_alpha", a.take("network_alpha", 1.0))

    def num(key: str, default: Any, cast: Any) -> Any:
        raw = nargs.take(key)
        if raw is None or raw == "" or raw.lower() == "none":
            return default
        try:
            return cast(raw)
        except ValueError:
            raise ConfigError(f"network_args {key} = {raw!r}: expected a number") from None

    conv_dim = num("conv_dim", dim, lambda s: int(float(s)))  # 0 turns 3x3 convs off, as in LyCORIS
    conv_alpha = num("conv_alpha", alpha, float)
    tucker_keys = [k for k in ("use_tucker", "use_cp", "use_conv_cp") if nargs.has(k)]
    use_tucker = any(_str_bool(nargs.take(k)) for k in tucker_keys)
    if nargs.has("disable_conv_cp") and not _str_bool(nargs.take("disable_conv_cp")):
        use_tucker = True
    raw_both = nargs.take("decompose_both")
    decompose_both = raw_both is not None and _str_bool(raw_both)
    if raw_both is not None and raw_both.lower() == "false":
        ctx.note("network_args.decompose_both", raw_both, "lycoris.kohya passes this string on unparsed, so LyCORIS "
                 "treats \"False\" as true; written as false, the evident intent")
    root = _Root(
        dim=dim,
        alpha=alpha,
        conv_dim=conv_dim,
        conv_alpha=conv_alpha,
        factor=num("factor", -1, lambda s: int(float(s))),
        full_matrix=_str_bool(nargs.take("full_matrix", "false")),
        use_tucker=use_tucker,
        decompose_both=decompose_both,
        weight_decompose=_str_bool(nargs.take("dora_wd", "false")),
        unbalanced_factorization=_str_bool(nargs.take("unbalanced_factorization", "false")),
    )
    extra: dict[str, Any] = {}
    for key in ("dropout", "rank_dropout", "module_dropout"):
        value = num(key, 0.0, float)
        if value:
            extra[key] = value
    if _str_bool(nargs.take("bypass_mode", "false")):
        extra["forward_mode"] = "bypass"
    if not _str_bool(nargs.take("wd_on_output", "true")):
        ctx.unsupported("network_args.wd_on_output", "False", "DoKr magnitude per input column is not implemented")
    if _str_bool(nargs.take("train_norm", "false")):
        ctx.unsupported("network_args.train_norm", "True", "norm layers are never trained here (LoKr on Linear/Conv only)")
    for key, why in (("rs_lora", "rank-stabilised scaling disagrees with every loader when both factors are dense"),
                     ("use_scalar", "the trainable LoKr scalar is not implemented")):
        raw = nargs.take(key)
        if raw is not None:
            (ctx.unsupported if _str_bool(raw) else ctx.ignored)(f"network_args.{key}", raw, why)
    for key in ("rescaled", "constraint", "block_size", "train_t5xxl", "train_llm_adapter", "rank_dropout_scale"):
        raw = nargs.take(key)
        if raw is not None:
            ctx.ignored(f"network_args.{key}", raw, "lycoris.kohya does not use it for LoKr on SDXL")
    for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        raw = nargs.take(key)
        if raw is not None:
            ctx.unsupported(f"network_args.{key}", raw, _UNSUPPORTED[key][0])
    if root.full_matrix or min(dim, conv_dim) >= _ALWAYS_FULL_DIM:
        for key, value in (("network_dim", a.data.get("network_dim")), ("network_alpha", a.data.get("network_alpha"))):
            if value is not None:
                ctx.ignored(key, value, "both Kronecker factors are dense (full matrix): no rank, scale 1")
    preset_arg = nargs.take("preset", "full")
    return extra, root, str(preset_arg)


def _convert_lokr(ctx: _Ctx, cfg: dict, preset_doc: Mapping[str, Any] | None, preset_label: str, net_preset: str,
                  root: _Root, unet_only: bool, te_only: bool, extra: Mapping[str, Any]) -> None:
    from lokr_trainer.lokr.names import sdxl_module_table

    if preset_doc is None:
        if net_preset not in _BUILTIN_PRESETS:
            raise ConfigError(
                f"network_args preset = {net_preset!r} is neither a LyCORIS builtin preset "
                f"({', '.join(_BUILTIN_PRESETS)}) nor a file that was found; pass --lycoris-preset FILE"
            )
        preset_doc, preset_label = _BUILTIN_PRESETS[net_preset], f"LyCORIS preset {net_preset!r}"
    preset = _preset_from(preset_doc, preset_label or "LyCORIS preset", ctx.findings)
    comps = ["unet"] if unet_only else ["te1", "te2"] if te_only else ["unet", "te1", "te2"]
    table = sdxl_module_table()
    target = _lycoris_target(table, preset, root, comps, ctx.findings)
    cfg["lokr"] = _choose_lokr(target, extra, table)


def _resolution(name: str, value: Any) -> tuple[int, int]:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f'{name} = {_show(value)}: expected "W,H" or a number') from None
    elif isinstance(value, (list, tuple)):
        nums = [_int(name, v) for v in value]
    else:
        nums = [_int(name, value)]
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or min(nums) <= 0:
        raise ConfigError(f"{name} = {_show(value)}: expected one or two positive sizes")
    return nums[0], nums[1]


@dataclass
class _DataInfo:
    batch_size: int
    repeats: list[int]
    image_dirs: list[str]


def _convert_data(a: _Table, ctx: _Ctx, cfg: dict, dataset: Mapping[str, Any] | None) -> _DataInfo:
    subsets: list[_Chain] = []
    if dataset is not None:
        for key in ("train_data_dir", "reg_data_dir", "in_json"):
            if a.has(key):
                ctx.ignored(key, a.take(key), "kohya ignores it when a dataset config is given")
        for k in dataset:
            if k not in ("general", "datasets"):
                raise ConfigError(f"dataset config: unknown top-level key {k!r}; expected [general] and [[datasets]]")
        general = _Table(_as_table("dataset config [general]", dataset.get("general", {})), "general")
        ctx.tables.append(general)
        datasets = dataset.get("datasets", [])
        if not isinstance(datasets, list) or not datasets:
            raise ConfigError("dataset config has no [[datasets]] table (kohya needs at least one)")
        for i, d in enumerate(datasets):
            dt = _Table(_as_table(f"dataset config [[datasets]] #{i + 1}", d), f"datasets[{i}]")
            ctx.tables.append(dt)
            subs = dt.take("subsets", [])
            if not isinstance(subs, list) or not subs:
                raise ConfigError(f"dataset config datasets[{i}] has no [[datasets.subsets]] (kohya needs image_dir)")
            for j, s in enumerate(subs):
                st = _Table(_as_table(f"dataset config datasets[{i}].subsets[{j}]", s), f"datasets[{i}].subsets[{j}]")
                ctx.tables.append(st)
                subsets.append(_Chain(st, dt, general, a))
    else:
        root = a.take("train_data_dir")
        if a.has("in_json"):
            ctx.unsupported("in_json", a.take("in_json"), _UNSUPPORTED["in_json"][0])
        if root is None:
            raise ConfigError("no training data: give train_data_dir (or dataset_config / --dataset-config)")
        sub = _Table({"image_dir": root}, "")
        sub.used.add("image_dir")
        subsets.append(_Chain(sub, a))
        repeats = _dreambooth_repeats(Path(_str("train_data_dir", root)))
        if repeats:
            sub.data["num_repeats"] = repeats[0] if len(set(repeats)) == 1 else repeats
            ctx.note("train_data_dir", root, f"DreamBooth folders N_name give repeats {sorted(set(repeats))}; "
                     "images are read recursively, captions from their .txt sidecars")

    def each(key: str, default: Any, check: Any) -> list[tuple[Any, str]]:
        out = []
        for ch in subsets:
            value, table = ch.find(key)
            out.append((default if table is None else check(ch.where(key), value), ch.where(key)))
        return out

    def one(key: str, default: Any, check: Any) -> Any:
        values = each(key, default, check)
        distinct = []
        for v, _ in values:
            if v not in distinct:
                distinct.append(v)
        if len(distinct) > 1:
            ctx.note(key, _NO_VALUE, "subsets disagree (" + ", ".join(f"{w} = {_show(v)}" for v, w in values)
                     + f"); lokr_trainer has one value for all data: used {_show(distinct[0])}")
        return distinct[0]

    # which subsets are data
    dirs: list[str] = []
    repeats: list[int] = []
    for ch in subsets:
        is_reg = ch.take("is_reg", False)
        image_dir = ch.take("image_dir")
        meta = ch.take("metadata_file")
        if is_reg:
            ctx.unsupported(ch.where("is_reg"), True, f"regularisation images are not supported; {image_dir} is not used")
            ch.take("num_repeats")
            continue
        if meta is not None:
            ctx.unsupported(ch.where("metadata_file"), meta, _UNSUPPORTED["in_json"][0])
        if image_dir is None:
            raise ConfigError("a dataset subset has no image_dir (lokr_trainer reads images from folders)")
        image_dir = _str(ch.where("image_dir"), image_dir)
        r = ch.take("num_repeats", 1)
        r_list = r if isinstance(r, list) else [r]
        repeats.extend(_int(ch.where("num_repeats"), x) for x in r_list)
        if image_dir not in dirs:
            dirs.append(image_dir)
        elif dataset is not None:
            ctx.note(ch.where("image_dir"), image_dir, "listed more than once (kohya multi-resolution); used once")
    if not dirs:
        raise ConfigError("the dataset config has no non-regularisation subset with an image_dir")
    data, cap = cfg["data"], cfg["caption"]
    data["path"] = dirs

    wh = one("resolution", None, _resolution)
    if wh is None:
        raise ConfigError("resolution is missing (kohya needs it in the arguments or the dataset config)")
    w, h = wh
    step = one("bucket_reso_steps", 64, _int)
    res = max(step, round(math.sqrt(w * h) / step) * step)  # the square of (nearly) the same area
    if (w, h) != (res, res):
        ctx.note("resolution", f"{w},{h}", f"buckets here have area resolution²: written as data.resolution = {res}")
    data["resolution"] = res
    data["bucket_step"] = step
    if one("enable_bucket", False, _bool):
        data["min_bucket"] = one("min_bucket_reso", 256, _int)
        data["max_bucket"] = one("max_bucket_reso", 1024, _int)
    else:
        for key in ("min_bucket_reso", "max_bucket_reso"):
            for ch in subsets:
                if ch.find(key)[1] is not None:
                    ctx.ignored(ch.where(key), ch.take(key), "enable_bucket is off")
        data["min_bucket"] = data["max_bucket"] = res
        ctx.note("enable_bucket", False, f"no buckets: one {res}x{res} bucket (min_bucket = max_bucket = {res})")
    if one("bucket_no_upscale", False, _bool):
        ctx.unsupported("bucket_no_upscale", True, _UNSUPPORTED["bucket_no_upscale"][0])
    data["crop"] = "random" if one("random_crop", False, _bool) else "center"
    data["flip_prob"] = 0.5 if one("flip_aug", False, _bool) else 0.0
    data["num_workers"] = _int("max_data_loader_n_workers", a.take("max_data_loader_n_workers", 8))
    data["cache_latents"] = _bool("cache_latents", a.take("cache_latents", False)) or _bool(
        "cache_latents_to_disk", a.take("cache_latents_to_disk", False))
    data["cache_text"] = _bool("cache_text_encoder_outputs", a.take("cache_text_encoder_outputs", False)) or _bool(
        "cache_text_encoder_outputs_to_disk", a.take("cache_text_encoder_outputs_to_disk", False))
    mtl = a.take("max_token_length")
    data["max_tokens"] = 75 if mtl is None else _int("max_token_length", mtl)
    data["keep_tokens"] = one("keep_tokens", 0, _int)
    sep = one("keep_tokens_separator", "", _str)
    if sep not in ("", "|||"):
        ctx.unsupported("keep_tokens_separator", sep, 'only "|||" marks a fixed caption head here')
    csep = one("caption_separator", ",", _str)
    if csep.strip() != ",":
        ctx.unsupported("caption_separator", csep, "captions are comma-separated here")
    ext = one("caption_extension", ".caption", _str)
    if ext.lstrip(".") not in ("txt", "json"):
        where = "" if any(ch.find("caption_extension")[1] for ch in subsets) else " (kohya's default)"
        ctx.note("caption_extension", ext, f"captions are read from .txt / .json sidecars, not {ext}{where}: "
                 "rename the caption files")
    cap["shuffle_general"] = one("shuffle_caption", False, _bool)
    cap["tag_dropout"] = one("caption_tag_dropout_rate", 0.0, _float)
    cap["caption_dropout"] = one("caption_dropout_rate", 0.0, _float)
    for key in ("caption_prefix", "caption_suffix", "secondary_separator", "enable_wildcard", "token_warmup_step",
                "token_warmup_min", "caption_dropout_every_n_epochs", "color_aug", "face_crop_aug_range",
                "class_tokens", "cache_info", "alpha_mask", "custom_attributes", "resize_interpolation",
                "network_multiplier", "validation_split", "validation_seed", "conditioning_data_dir"):
        seen = set()
        for ch in subsets:
            value, table = ch.find(key)
            if table is not None and table.name(key) not in seen:
                seen.add(table.name(key))
                ctx.findings.append(_classify(key, table.label, value))

    batch = one("batch_size", None, _int)
    if batch is None:
        batch = _int("train_batch_size", a.take("train_batch_size", 1))
    else:
        a.take("train_batch_size")
    return _DataInfo(batch, repeats, dirs)


def _dreambooth_repeats(root: Path) -> list[int]:
    try:
        names = sorted(p.name for p in root.iterdir() if p.is_dir())
    except OSError:
        return []
    return [int(m.group(1)) for n in names if (m := re.match(r"^(\d+)_", n))]


def _as_table(what: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{what} must be a table, got {_show(value)}")
    return value


def _convert_diffusion(a: _Table, ctx: _Ctx, cfg: dict) -> None:
    d = cfg["diffusion"]
    d["prediction"] = "v_prediction" if _bool("v_parameterization", a.take("v_parameterization", False)) else "epsilon"
    gamma = a.take("min_snr_gamma")
    d["min_snr_gamma"] = 0.0 if gamma is None else _float("min_snr_gamma", gamma)
    d["debiased_estimation"] = _bool("debiased_estimation_loss", a.take("debiased_estimation_loss", False))
    for ours, theirs in (("ip_noise_gamma", "ip_noise_gamma"), ("noise_offset", "noise_offset")):
        v = a.take(theirs)
        d[ours] = 0.0 if v is None else _float(theirs, v)
    it = a.take("multires_noise_iterations")
    d["multires_noise_iterations"] = 0 if it is None else _int("multires_noise_iterations", it)
    d["multires_noise_discount"] = _float("multires_noise_discount", a.take("multires_noise_discount", 0.3))
    d["zero_terminal_snr"] = _bool("zero_terminal_snr", a.take("zero_terminal_snr", False))
    lo, hi = a.take("min_timestep"), a.take("max_timestep")
    d["min_timestep"] = 0 if lo is None else _int("min_timestep", lo)
    d["max_timestep"] = 1000 if hi is None else _int("max_timestep", hi)
    if d["min_timestep"] == d["max_timestep"]:
        raise ConfigError(
            f"min_timestep = max_timestep = {d['max_timestep']}: kohya then trains one timestep; timesteps here are "
            "drawn from [min, max): set max_timestep one higher"
        )


def _convert_optimizer(a: _Table, ctx: _Ctx, cfg: dict, unet_only: bool, te_only: bool) -> None:
    o = cfg["optimizer"]
    raw = a.take("optimizer_type")
    if raw is None:
        raw = ("AdamW8bit" if _bool("use_8bit_adam", a.take("use_8bit_adam", False))
               else "Lion" if _bool("use_lion_optimizer", a.take("use_lion_optimizer", False)) else "AdamW")
    else:
        a.take("use_8bit_adam")
        a.take("use_lion_optimizer")
    name = _OPTIMIZERS.get(_str("optimizer_type", raw).lower())
    if name is None:
        ctx.unsupported("optimizer_type", raw, "supported: Lion8bit, AdamW8bit, AdamW, Lion; wrote optimizer.name = "
                        "\"adamw\": change it")
        name = "adamw"
    elif raw.lower().startswith("paged"):
        ctx.note("optimizer_type", raw, f"the paged variant has the same update rule: written as {name!r}")
    o["name"] = name
    betas, wd = _OPT_DEFAULTS[name]
    eps = 1e-8
    oargs = _Table(_kv_list("optimizer_args", a.take("optimizer_args", [])), "optimizer_args")
    ctx.tables.append(oargs)

    def literal(key: str) -> Any:
        text = oargs.take(key)
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ConfigError(f"optimizer_args {key}={text}: not a Python literal (kohya reads it with literal_eval)") from None

    if oargs.has("betas"):
        b = literal("betas")
        if not isinstance(b, (list, tuple)) or len(b) != 2:
            raise ConfigError(f"optimizer_args betas = {b!r}: expected two numbers, e.g. betas=0.9,0.95")
        betas = [_float("optimizer_args betas", x) for x in b]
    if oargs.has("weight_decay"):
        wd = _float("optimizer_args weight_decay", literal("weight_decay"))
    if oargs.has("eps"):
        eps = _float("optimizer_args eps", literal("eps"))
    o["weight_decay"] = wd
    o["betas"] = betas
    o["eps"] = eps
    lr = a.take("learning_rate")
    if lr is None:
        lr = _KOHYA_LR
        ctx.note("learning_rate", _NO_VALUE, f"not set: kohya's default {lr:g} is used where unet_lr/text_encoder_lr are unset")
    lr = _float("learning_rate", lr)
    unet_lr = a.take("unet_lr")
    o["unet_lr"] = lr if unet_lr is None else _float("unet_lr", unet_lr)
    te = a.take("text_encoder_lr")
    te_list = [lr, lr] if te is None else [_float("text_encoder_lr", x) for x in (te if isinstance(te, list) else [te])]
    if len(te_list) == 1:
        te_list = te_list * 2
    if len(te_list) != 2:
        raise ConfigError(f"text_encoder_lr = {te!r}: expected one number or one per text encoder (two)")
    for i, key in ((0, "learning_rate_te1"), (1, "learning_rate_te2")):
        v = a.take(key)
        if v is not None:
            te_list[i] = _float(key, v)
    o["te1_lr"], o["te2_lr"] = te_list
    if unet_only and (te is not None):
        ctx.ignored("text_encoder_lr", te, "network_train_unet_only: the text encoders are not trained")
    o["max_grad_norm"] = _float("max_grad_norm", a.take("max_grad_norm", 1.0))


def _convert_length(a: _Table, ctx: _Ctx, cfg: dict, info: _DataInfo) -> int | None:
    """Run length; returns the step count when known (for fractional warmups)."""
    t = cfg["train"]
    epochs, steps = a.take("max_train_epochs"), a.take("max_train_steps")
    if epochs is not None:
        epochs = _int("max_train_epochs", epochs)
        if steps is not None:
            ctx.ignored("max_train_steps", steps, "kohya lets max_train_epochs override it")
        reps = set(info.repeats)
        if reps == {1}:
            t["epochs"] = epochs
        elif len(reps) == 1:
            (r,) = reps
            t["epochs"] = epochs * r
            ctx.note("num_repeats", r, f"an epoch here is one pass over the images, so max_train_epochs = {epochs} "
                     f"× {r} repeats is written as train.epochs = {epochs * r}")
        else:
            t["epochs"] = epochs
            ctx.unsupported("num_repeats", sorted(reps), "per-folder repeats (weighting) are not supported: every image "
                            f"is used once per epoch; train.epochs = {epochs} (adjust it, or duplicate data)")
        return None
    if steps is None:
        steps = _KOHYA_STEPS
        ctx.note("max_train_steps", _NO_VALUE, f"not set: kohya's default {steps} optimizer steps")
    t["max_steps"] = _int("max_train_steps", steps)
    if len(set(info.repeats)) > 1:
        ctx.unsupported("num_repeats", sorted(set(info.repeats)), "per-folder repeats (weighting) are not supported: "
                        "every folder is sampled in proportion to its size")
    elif info.repeats and info.repeats[0] != 1:
        ctx.ignored("num_repeats", info.repeats[0], "the run length is in steps, and one repeat count for all data "
                    "changes nothing else")
    return t["max_steps"]


def _convert_scheduler(a: _Table, ctx: _Ctx, cfg: dict, steps: int | None) -> None:
    s = cfg["scheduler"]
    raw = _str("lr_scheduler", a.take("lr_scheduler", "constant"))
    warm = a.take("lr_warmup_steps", 0)
    warm = _float("lr_warmup_steps", warm) if isinstance(warm, float) else _int("lr_warmup_steps", warm)
    if isinstance(warm, float) and 0 < warm < 1:
        if steps is None:
            ctx.unsupported("lr_warmup_steps", warm, "a fraction of the run needs max_train_steps; wrote 0 warmup steps")
            warm = 0
        else:
            ctx.note("lr_warmup_steps", warm, f"a fraction of {steps} steps: written as {round(warm * steps)} steps")
            warm = round(warm * steps)
    warm = int(warm)
    name = _SCHEDULERS.get(raw)
    if name is None:
        ctx.unsupported("lr_scheduler", raw, "supported: constant, constant_with_warmup, cosine, cosine_with_min_lr; "
                        "wrote constant(_with_warmup): change scheduler.name")
        name = "constant"
    if name == "constant" and warm > 0:
        name = "constant_with_warmup"
        ctx.note("lr_scheduler", raw, "kohya refuses warmup with \"constant\": written as constant_with_warmup")
    s["name"] = name
    s["warmup_steps"] = warm
    ratio = a.take("lr_scheduler_min_lr_ratio")
    if ratio is not None:
        if raw == "cosine_with_min_lr":
            s["min_lr_ratio"] = _float("lr_scheduler_min_lr_ratio", ratio)
        else:
            ctx.ignored("lr_scheduler_min_lr_ratio", ratio, f"only used by cosine_with_min_lr, not {raw}")


def _convert_train(a: _Table, ctx: _Ctx, cfg: dict, info: _DataInfo, num_processes: int) -> str:
    t = cfg["train"]
    out_dir = a.take("output_dir")
    out_name = a.take("output_name")
    out_dir = "output" if out_dir is None else _str("output_dir", out_dir)
    if out_name is not None:
        out_dir = str(Path(out_dir) / _str("output_name", out_name))
        ctx.note("output_name", out_name, f"the run writes {out_dir}/lokr.safetensors (and its states) into "
                 "train.output_dir")
    t["output_dir"] = out_dir
    seed = a.take("seed")
    if seed is None:
        ctx.note("seed", _NO_VALUE, "not set: kohya draws a random seed; written as train.seed = 0")
        seed = 0
    t["seed"] = _int("seed", seed)
    t["batch_size"] = info.batch_size
    accum = _int("gradient_accumulation_steps", a.take("gradient_accumulation_steps", 1))
    t["global_batch"] = info.batch_size * accum * num_processes
    t["gradient_checkpointing"] = _bool("gradient_checkpointing", a.take("gradient_checkpointing", False))
    every = a.take("save_every_n_steps")
    t["save_every"] = 0 if every is None else _int("save_every_n_steps", every)
    for key in ("save_last_n_steps_state", "save_last_n_steps"):
        n = a.take(key)
        if n is None:
            continue
        n = _int(key, n)
        if t["save_every"] and "keep_last" not in t:
            t["keep_last"] = max(1, n // t["save_every"])
            ctx.note(key, n, f"kept saves are counted, not steps: {n} // save_every_n_steps = {t['keep_last']} "
                     "(train.keep_last)")
        elif "keep_last" not in t:
            ctx.ignored(key, n, "save_every_n_steps is not set")
        else:
            ctx.ignored(key, n, "train.keep_last already follows save_last_n_steps_state")
    prec = a.take("save_precision")
    if prec not in _SAVE_DTYPE:
        raise ConfigError(f'save_precision = {_show(prec)}: expected "fp16", "bf16" or "float"')
    t["save_dtype"] = _SAVE_DTYPE[prec]
    return (
        f"Global batch: train_batch_size {info.batch_size} x gradient_accumulation_steps {accum} x "
        f"{num_processes} process(es) (--num-processes; kohya does not store it) = {t['global_batch']} "
        "(train.global_batch); it defines the run, whatever the GPU count"
    )


# ----------------------------------------------------------------------------- files and CLI


def convert_files(
    args_path: str | Path,
    *,
    dataset_path: str | Path | None = None,
    preset_path: str | Path | None = None,
    num_processes: int = 1,
) -> Conversion:
    """Read the kohya files (the dataset/preset ones may also be named inside ARGS) and convert them."""
    args_path = Path(args_path)
    args = flatten_args(read_toml(args_path, "kohya config file"))
    base = args_path.parent
    sources = ["Converted from kohya sd-scripts by `python -m lokr_trainer.config from-kohya`:", f"  args: {args_path}"]
    dataset = None
    if dataset_path is None and args.get("dataset_config") is not None:
        dataset_path = _near(_str("dataset_config", args["dataset_config"]), base)
    elif dataset_path is not None and args.get("dataset_config") is not None:
        sources.append(f"  (--dataset-config replaces dataset_config = {args['dataset_config']})")
    if dataset_path is not None:
        dataset = read_toml(Path(dataset_path), "kohya dataset config")
        sources.append(f"  dataset config: {dataset_path}")
    preset = None
    label = ""
    net = _kv_list("network_args", args.get("network_args", [])) if args.get("network_module") == "lycoris.kohya" else {}
    if preset_path is None and net.get("preset") and net["preset"] not in _BUILTIN_PRESETS:
        preset_path = _near(net["preset"], base)
        if not preset_path.exists():
            raise ConfigError(
                f"network_args preset={net['preset']} is neither a LyCORIS builtin preset "
                f"({', '.join(_BUILTIN_PRESETS)}) nor a file (looked in the working folder and beside {args_path}); "
                "pass --lycoris-preset FILE"
            )
    elif preset_path is not None and net.get("preset") and net["preset"] != str(preset_path):
        sources.append(f"  (--lycoris-preset replaces network_args preset={net['preset']})")
    if preset_path is not None:
        preset = read_toml(Path(preset_path), "LyCORIS preset")
        label = f"preset {Path(preset_path).name}"
        sources.append(f"  LyCORIS preset: {preset_path}")
    conv = convert(args, dataset=dataset, preset=preset, preset_label=label, num_processes=num_processes)
    conv.sources = sources
    return conv


def _near(name: str, base: Path) -> Path:
    """A file named in the kohya config: as given (kohya's working dir), else beside the config."""
    p = Path(name)
    if p.is_absolute() or p.exists() or not (base / p).exists():
        return p
    return base / p


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2
        raise ConfigError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m lokr_trainer.config from-kohya",
                description="Convert a kohya sd-scripts SDXL LoKr config (LyCORIS) into a lokr_trainer run config.")
    p.add_argument("args", help="kohya's --config_file TOML (command-line arguments as keys)")
    p.add_argument("--dataset-config", help="kohya's dataset config TOML (default: dataset_config in ARGS)")
    p.add_argument("--lycoris-preset", help="LyCORIS preset TOML (default: network_args preset=...)")
    p.add_argument("-o", "--output", required=True, help="the run config to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--num-processes", type=int, default=1,
                   help="GPUs of the kohya run: global batch = batch x accumulation x this (default 1)")
    return p


def write_run_config(conv: Conversion, path: Path, *, overwrite: bool) -> None:
    """Validate the text with load_config, then write it atomically (never over a file unless asked)."""
    from lokr_trainer.config.run_config import load_config
    from lokr_trainer.safetensors_io import atomic_output

    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; pass --overwrite to replace it")
    text = conv.to_toml()
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "run.toml"
        probe.write_text(text, encoding="utf-8")
        try:
            load_config(probe)
        except ConfigError as e:
            raise ConfigError(f"the converted config does not validate: {e}") from None
    with atomic_output(path, overwrite=overwrite) as fd:
        os.write(fd, text.encode("utf-8"))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        ns = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        conv = convert_files(ns.args, dataset_path=ns.dataset_config, preset_path=ns.lycoris_preset,
                             num_processes=ns.num_processes)
        out = Path(ns.output)
        write_run_config(conv, out, overwrite=ns.overwrite)
    except LokrTrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    for line in conv.report_lines():
        print(line)
    print(f"wrote {out}")
    return 0
