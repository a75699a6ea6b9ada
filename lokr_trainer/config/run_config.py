"""The one typed run config: TOML tables, ``--set`` overrides, validation, help text.

``python -m lokr_trainer.train --config run.toml [--set table.key=value ...]``
reads one TOML file into a :class:`RunConfig`.  Each table is a dataclass
whose field types drive validation (one small validator per kind: bool, int,
float, str, list) and whose ranges and choices live in one rule table,
:data:`RULES`, so a wrong value is refused with a message that names the
dotted key, the value and what was expected.  ``[lokr]`` is
:class:`~lokr_trainer.lokr.targets.LoKrConfig` and ``[caption]`` is
:class:`~lokr_trainer.data.tags.CaptionConfig`: they are used as they are,
type-checked here, and their own checks' messages are reworded to name
``lokr.<key>`` / ``caption.<key>``.

The *resolved* config (every default filled in, optional learning rates
resolved) is written next to every output by :func:`save_config`;
:func:`run_defining_dict` is the part of it that decides a run's result, so a
resume with a different config can be refused.  File existence is not
checked here: the trainer does it, where it can say more.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union, get_args, get_origin, get_type_hints

import tomli_w

from lokr_trainer.data.buckets import BucketConfig
from lokr_trainer.data.tags import CaptionConfig
from lokr_trainer.errors import ConfigError
from lokr_trainer.lokr.names import ADAPTER_COMPONENTS, KINDS
from lokr_trainer.lokr.targets import FORWARD_MODES, PRESETS, TARGET_PRESETS, FactorRule, LoKrConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "CAPTION_HELP",
    "DataConfig",
    "DiffusionConfig",
    "FieldHelp",
    "LOKR_HELP",
    "LOKR_RULE_HELP",
    "ModelConfig",
    "OptimizerConfig",
    "RULES",
    "Rule",
    "RunConfig",
    "SampleConfig",
    "SchedulerConfig",
    "TrainConfig",
    "ValidationConfig",
    "apply_override",
    "load_config",
    "run_defining_dict",
    "save_config",
    "schema",
]

DTYPES: tuple[str, ...] = ("fp32", "fp16", "bf16")
TOKEN_WINDOW = 75  # CLIP tokens per prompt window (train/prompts.py)
NUM_TRAIN_TIMESTEPS = 1000


def _f(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with its help text (factory for mutable defaults)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the frozen SDXL base."""

    path: str = _f("", "The SDXL base: a single-file .safetensors checkpoint or a diffusers folder (required).")
    dtype: str = _f("fp32", "Dtype of the frozen UNet and text encoders: fp32, fp16 or bf16 (adapters train in fp32).")
    vae_dtype: str = _f("fp32", "Dtype of the VAE: fp32, fp16 or bf16; keep fp32, SDXL's VAE overflows in fp16.")
    allow_pickle: bool = _f(False, "Allow pickle-based .ckpt/.bin files, which can run code when loaded (off).")
    init_lokr: str = _f(
        "",
        "Start the adapters from this LoKr .safetensors file (e.g. a published one) instead of ΔW = 0; "
        "its modules and factor shapes must match the [lokr] selection (empty = fresh adapters). "
        "With train.train_text_encoders = false its text-encoder modules are baked into the frozen encoders "
        "and saved untrained next to the trained UNet modules (in train.save_dtype, like the whole file).",
    )


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: where the images come from and how they become batches."""

    path: list[str] = _f(
        help="Training data: folders, .jsonl manifests or tar shard patterns; a string is one source (required).",
        factory=list,
    )
    resolution: int = _f(1024, "Bucket area is resolution² pixels (SDXL recipes: 1024); a multiple of bucket_step.")
    min_bucket: int = _f(256, "Shortest bucket side in pixels (recipes: 256).")
    max_bucket: int = _f(4096, "Longest bucket side in pixels (recipes: 4096).")
    bucket_step: int = _f(64, "Bucket sides are multiples of this many pixels (recipes: 64; a multiple of 8).")
    crop: str = _f("center", "How an image is cropped to its bucket: center or random (latent caching needs center).")
    flip_prob: float = _f(0.0, "Probability of a horizontal flip per sample and step (0 = never).")
    num_workers: int = _f(2, "DataLoader worker processes per device (0 = load in the main process).")
    cache_latents: bool = _f(False, "Encode images with the VAE once and reuse the latents (needs crop = center).")
    cache_text: bool = _f(
        False, "Cache text-encoder outputs; only possible when the text encoders are frozen and captions are fixed."
    )
    cache_dir: str = _f("", "Where the latent and text caches live; empty means <output_dir>/cache.")
    max_tokens: int = _f(75, "Prompt length in CLIP tokens, a positive multiple of 75 (Kohaku XL recipes: 300).")
    prompt_layout: str = _f("kohya", "How long prompts are joined: kohya (75n+2 positions) or concat (77n positions).")
    keep_tokens: int = _f(0, "Number of leading caption items kept in place when tags are shuffled.")
    verify_sizes: bool = _f(
        True, "Read each image's header to check the size a sidecar/manifest states before it picks a bucket "
        "(wrong sizes are corrected and counted); false trusts stated sizes (a wrong one is skipped at decode).",
    )
    drop_incomplete: bool = _f(
        False, "Drop a bucket's last short global batch instead of padding it with zero-weight samples."
    )


@dataclass(frozen=True)
class DiffusionConfig:
    """``[diffusion]``: noise, timesteps and loss weighting (DESIGN.md §6)."""

    prediction: str = _f("epsilon", "What the UNet predicts: epsilon (SDXL base) or v_prediction.")
    min_snr_gamma: float = _f(0.0, "Min-SNR loss weighting gamma (typical 5); 0 turns it off.")
    debiased_estimation: bool = _f(False, "Weight the loss by 1/sqrt(SNR) (debiased estimation, SNR capped at 1000).")
    ip_noise_gamma: float = _f(0.0, "Input-perturbation noise strength (Kohaku XL Zeta: 0.05); 0 turns it off.")
    noise_offset: float = _f(0.0, "Noise offset added per channel (typical 0.0357); 0 turns it off.")
    multires_noise_iterations: int = _f(0, "Pyramid (multi-resolution) noise levels; 0 turns it off.")
    multires_noise_discount: float = _f(0.3, "Weight decay per level of multi-resolution noise (typical 0.3).")
    zero_terminal_snr: bool = _f(False, "Rescale the noise schedule to zero SNR at the last step (use with v_prediction).")
    min_timestep: int = _f(0, "Smallest training timestep (inclusive); timesteps are uniform in [min, max).")
    max_timestep: int = _f(1000, "Largest training timestep (exclusive), at most 1000.")


@dataclass(frozen=True)
class OptimizerConfig:
    """``[optimizer]``: the optimizer and its learning rates."""

    name: str = _f("adamw", "Optimizer: lion8bit (Kohaku XL recipes), adamw8bit, adamw or lion.")
    unet_lr: float = _f(1e-4, "Learning rate of the UNet adapters.")
    te1_lr: float | None = _f(None, "Learning rate of the CLIP-L (te1) adapters; unset means unet_lr.")
    te2_lr: float | None = _f(None, "Learning rate of the CLIP-bigG (te2) adapters; unset means unet_lr.")
    weight_decay: float = _f(0.01, "Decoupled weight decay (Kohaku XL recipes with Lion8bit: 0.1).")
    betas: list[float] = _f(
        help="The two momentum coefficients, each in [0, 1) (recipes with Lion8bit: [0.9, 0.95]).",
        factory=lambda: [0.9, 0.999],
    )
    eps: float = _f(1e-8, "Denominator epsilon of the Adam optimizers (Lion has none).")
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this value; 0 means no clipping.")


@dataclass(frozen=True)
class SchedulerConfig:
    """``[scheduler]``: the learning-rate schedule (counted in optimizer steps)."""

    name: str = _f("constant_with_warmup", "LR schedule: constant, constant_with_warmup (Kohaku XL recipes) or cosine.")
    warmup_steps: int = _f(0, "Linear warmup length in optimizer steps (not micro-steps).")
    min_lr_ratio: float = _f(0.0, "Cosine floor as a fraction of the peak learning rate.")


@dataclass(frozen=True)
class TrainConfig:
    """``[train]``: run length, batch layout, precision, checkpoints."""

    output_dir: str = _f("output", "Folder for adapters, training states, logs and the resolved config.")
    seed: int = _f(0, "Seed of every random draw (noise, timesteps, captions, crops, data order, adapter init).")
    batch_size: int = _f(1, "Samples per device per micro-step.")
    grad_accum: int | None = _f(None, "Micro-steps per optimizer step; give this or global_batch (neither: 1).")
    global_batch: int | None = _f(
        None, "Samples per optimizer step over all devices; grad_accum is derived from it (give this or grad_accum)."
    )
    max_steps: int = _f(0, "Run length in optimizer steps; give exactly one of max_steps and epochs.")
    epochs: int = _f(0, "Run length in passes over the data; give exactly one of max_steps and epochs.")
    mixed_precision: str = _f("no", "Autocast precision: no, fp16 (with a grad scaler) or bf16.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    train_text_encoders: bool = _f(True, "Train the text-encoder adapters (Kohaku XL recipes: true).")
    save_every: int = _f(0, "Save adapter and training state every this many optimizer steps; 0 saves only at the end.")
    keep_last: int = _f(3, "How many periodic training states to keep (at least 1).")
    stop_after: int = _f(0, "Stop after this optimizer step with a resumable state (0 = off).")
    log_every: int = _f(10, "Log loss, lr and grad norm every this many optimizer steps (0 = off).")
    save_dtype: str = _f("fp16", "Dtype of the saved adapter files: fp16, bf16 or fp32.")
    max_bad_steps: int = _f(5, "Non-finite steps in a row that stop the run (the last good checkpoint is kept).")

    def accumulation(self, num_processes: int) -> tuple[int, int]:
        """``(grad_accum, global_batch)`` for ``num_processes`` devices.

        A run is defined by its global batch (DESIGN.md §6), so a given
        ``global_batch`` must split exactly into ``batch_size × processes``.
        """
        if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
            raise ConfigError(f"the number of processes must be a positive integer, got {num_processes!r}")
        per_step = self.batch_size * num_processes
        if self.global_batch is not None:
            if self.global_batch % per_step:
                below = (self.global_batch // per_step) * per_step
                above = below + per_step
                nearest = ", ".join(str(g) for g in (below, above) if g >= per_step)
                raise ConfigError(
                    f"train.global_batch = {self.global_batch} does not split into train.batch_size = "
                    f"{self.batch_size} × {num_processes} process(es) = {per_step}; "
                    f"nearest valid global batches: {nearest}"
                )
            return self.global_batch // per_step, self.global_batch
        accum = 1 if self.grad_accum is None else self.grad_accum
        return accum, per_step * accum


@dataclass(frozen=True)
class SampleConfig:
    """``[sample]``: preview images during training."""

    every: int = _f(0, "Render the sample prompts every this many optimizer steps (0 = off).")
    prompts: list[str] = _f(help="Prompts rendered at each sampling step.", factory=list)
    negative_prompt: str = _f("", "Negative prompt used for every sample.")
    steps: int = _f(20, "Denoising steps per sample image.")
    cfg: float = _f(5.0, "Classifier-free guidance scale.")
    width: int = _f(1024, "Sample image width in pixels (a multiple of 8).")
    height: int = _f(1024, "Sample image height in pixels (a multiple of 8).")
    seed: int = _f(0, "Seed of the sample images, the same at every sampling step so they compare.")


@dataclass(frozen=True)
class ValidationConfig:
    """``[validation]``: held-out loss at fixed timesteps."""

    path: list[str] = _f(help="Held-out data (folders, manifests or shards; a string is one source).", factory=list)
    every: int = _f(0, "Compute the validation loss every this many optimizer steps (0 = off; needs path).")
    timesteps: list[int] = _f(
        help="Fixed timesteps the validation loss is averaged over.", factory=lambda: [100, 300, 500, 700, 900]
    )
    max_samples: int = _f(64, "At most this many held-out samples are used.")
    batch_size: int = _f(4, "Validation batch size per device.")
    seed: int = _f(0, "Seed of the validation noise, fixed so losses compare across steps.")


#: Help of the ``[lokr]`` fields (LoKrConfig carries no metadata).
LOKR_HELP: dict[str, str] = {
    "components": "Which networks get adapters: any of unet, te1, te2.",
    "targets": "Module kinds selected: attn, attn-mlp or full (every Linear/Conv of the UNet).",
    "include": "Extra glob patterns of module names to select (file, dotted or diffusers spelling).",
    "exclude": "Glob patterns of module names to deselect after targets and include.",
    "factor": "Kronecker factor of the split; -1 picks the most balanced split (kohaku-xl-delta: 2-8 per kind).",
    "full_matrix": "Keep both Kronecker factors dense (no rank); the Kohaku XL Delta recipe uses true.",
    "dim": "Rank of a decomposed factor when full_matrix is false.",
    "alpha": "Scale alpha/dim applied when a factor is decomposed.",
    "decompose_both": "Decompose both Kronecker factors into low rank, not only the larger one.",
    "use_tucker": "Tucker decomposition for convolution kernels.",
    "weight_decompose": "DoRA-style magnitude/direction split (DoKr).",
    "unbalanced_factorization": "Swap the factor sizes of the split (LyCORIS' unbalanced_factorization).",
    "dropout": "Dropout on the adapter output, in [0, 1) (bypass forward only).",
    "rank_dropout": "Drop rows of the weight delta with this probability, in [0, 1).",
    "rank_dropout_scale": "Rescale after rank dropout to keep the expected delta.",
    "module_dropout": "Skip a module's whole adapter with this probability per step, in [0, 1).",
    "multiplier": "Strength of the adapters while training.",
    "forward_mode": "Forward implementation: auto, bypass, rebuild or merged (all give the same results).",
    "rules": "Ordered per-module settings ([[lokr.rules]] tables); the first matching rule wins.",
    "preset": "Start from a named preset (e.g. kohaku-xl-delta); the other keys override it.",
}

#: Help of the fields of one ``[[lokr.rules]]`` table.
LOKR_RULE_HELP: dict[str, str] = {
    "pattern": "Glob pattern(s) of module names this rule matches.",
    "kind": "Module kind(s) this rule matches (attn, ff, resnet_conv, te_attn, ...).",
    "component": "Component(s) this rule matches: unet, te1, te2.",
    "factor": "Kronecker factor for the matched modules (-1 = most balanced).",
    "full_matrix": "Dense factors for the matched modules.",
    "dim": "Rank for the matched modules when decomposed.",
    "alpha": "Alpha for the matched modules when decomposed.",
    "decompose_both": "Decompose both factors of the matched modules.",
    "use_tucker": "Tucker decomposition for the matched convolutions.",
    "weight_decompose": "DoKr magnitude for the matched modules.",
    "unbalanced_factorization": "Swapped factor sizes for the matched modules.",
    "forward_mode": "Forward implementation for the matched modules.",
    "skip": "Deselect the matched modules.",
}

#: Help of the ``[caption]`` fields (CaptionConfig carries no metadata).
CAPTION_HELP: dict[str, str] = {
    "shuffle_general": "Shuffle the general tags every step (the special groups keep their order).",
    "tag_dropout": "Drop each general tag with this probability per step (Delta: 0.1, Zeta: 0.2).",
    "group_dropout": "Drop either all tags or the NL caption with this probability each, at most 0.5 (Zeta: 0.2).",
    "caption_dropout": "Use an empty caption with this probability per step.",
    "quality_tags": "Add quality tags from fav_count percentiles per rating.",
    "rating_tags": "Add rating tags (safe, sensitive, nsfw, explicit).",
    "date_tags": "Add date tags from the upload year (old, early, mid, recent, newest).",
    "short_tag_max_len": "Tags of at most this many characters keep their underscores (emoticons like ^_^).",
    "keep_underscore": "Tags that keep their underscores whatever their length.",
    "people_tags": "Count tags moved to the front of the caption (1girl, 2boys, ...), in danbooru spelling.",
    "meta_drop_keywords": "Meta tags containing one of these substrings are dropped (about the post, not the image).",
    "separator": "String joining the caption items.",
}


@dataclass(frozen=True)
class Rule:
    """Range and choice rules of one field; for lists they apply to every item."""

    choices: tuple[Any, ...] | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    multiple_of: int | None = None
    length: int | None = None  # lists: exact number of items
    required: bool = False  # must not be empty
    scalar_ok: bool = False  # a list of strings also accepts one string

    def describe(self) -> str:
        lo = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        hi = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return (">= " if lo[0] == "[" else "> ") + lo[1:]
        if hi:
            return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
        return ""


_NONNEG = Rule(ge=0)
_POS = Rule(ge=1)
_PROB = Rule(ge=0, le=1)

#: Per-field rules, by dotted key; fields not listed only get their type checked.
RULES: dict[str, Rule] = {
    "model.path": Rule(required=True),
    "model.dtype": Rule(choices=DTYPES),
    "model.vae_dtype": Rule(choices=DTYPES),
    "lokr.components": Rule(choices=ADAPTER_COMPONENTS, scalar_ok=True),
    "lokr.targets": Rule(choices=tuple(TARGET_PRESETS)),
    "lokr.include": Rule(scalar_ok=True),
    "lokr.exclude": Rule(scalar_ok=True),
    "lokr.forward_mode": Rule(choices=FORWARD_MODES),
    "lokr.preset": Rule(choices=tuple(PRESETS)),
    "lokr.rules.pattern": Rule(scalar_ok=True),
    "lokr.rules.kind": Rule(choices=KINDS, scalar_ok=True),
    "lokr.rules.component": Rule(choices=ADAPTER_COMPONENTS, scalar_ok=True),
    "lokr.rules.forward_mode": Rule(choices=FORWARD_MODES),
    "data.path": Rule(required=True, scalar_ok=True),
    "data.resolution": _POS,
    "data.min_bucket": _POS,
    "data.max_bucket": _POS,
    "data.bucket_step": Rule(ge=8, multiple_of=8),
    "data.crop": Rule(choices=("center", "random")),
    "data.flip_prob": _PROB,
    "data.num_workers": _NONNEG,
    "data.max_tokens": Rule(ge=TOKEN_WINDOW, multiple_of=TOKEN_WINDOW),
    "data.prompt_layout": Rule(choices=("kohya", "concat")),
    "data.keep_tokens": _NONNEG,
    "caption.short_tag_max_len": _NONNEG,
    "diffusion.prediction": Rule(choices=("epsilon", "v_prediction")),
    "diffusion.min_snr_gamma": _NONNEG,
    "diffusion.ip_noise_gamma": _NONNEG,
    "diffusion.noise_offset": _NONNEG,
    "diffusion.multires_noise_iterations": _NONNEG,
    "diffusion.multires_noise_discount": _PROB,
    "diffusion.min_timestep": Rule(ge=0, lt=NUM_TRAIN_TIMESTEPS),
    "diffusion.max_timestep": Rule(gt=0, le=NUM_TRAIN_TIMESTEPS),
    "optimizer.name": Rule(choices=("lion8bit", "adamw8bit", "adamw", "lion")),
    "optimizer.unet_lr": _NONNEG,
    "optimizer.te1_lr": _NONNEG,
    "optimizer.te2_lr": _NONNEG,
    "optimizer.weight_decay": _NONNEG,
    "optimizer.betas": Rule(ge=0, lt=1, length=2),
    "optimizer.eps": _NONNEG,
    "optimizer.max_grad_norm": _NONNEG,
    "scheduler.name": Rule(choices=("constant", "constant_with_warmup", "cosine")),
    "scheduler.warmup_steps": _NONNEG,
    "scheduler.min_lr_ratio": _PROB,
    "train.seed": _NONNEG,
    "train.batch_size": _POS,
    "train.grad_accum": _POS,
    "train.global_batch": _POS,
    "train.max_steps": _NONNEG,
    "train.epochs": _NONNEG,
    "train.mixed_precision": Rule(choices=("no", "fp16", "bf16")),
    "train.save_every": _NONNEG,
    "train.keep_last": _POS,
    "train.stop_after": _NONNEG,
    "train.log_every": _NONNEG,
    "train.save_dtype": Rule(choices=("fp16", "bf16", "fp32")),
    "train.max_bad_steps": _POS,
    "sample.every": _NONNEG,
    "sample.steps": _POS,
    "sample.cfg": _NONNEG,
    "sample.width": Rule(ge=8, multiple_of=8),
    "sample.height": Rule(ge=8, multiple_of=8),
    "sample.seed": _NONNEG,
    "validation.path": Rule(scalar_ok=True),
    "validation.every": _NONNEG,
    "validation.timesteps": Rule(ge=0, lt=NUM_TRAIN_TIMESTEPS),
    "validation.max_samples": _POS,
    "validation.batch_size": _POS,
    "validation.seed": _NONNEG,
}


# ----------------------------------------------------------------------------- value validators


def _show(value: Any) -> str:
    """A value as the user wrote it in TOML (``true``, not ``True``)."""
    return ("true" if value else "false") if isinstance(value, bool) else repr(value)


def _type_error(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{key} = {_show(value)}: expected {expected}")


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _type_error(key, value, "a boolean (true or false)")
    return value


def _check_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(key, value, "an integer")
    return value


def _check_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(key, value, "a number")
    if not math.isfinite(value):
        raise _type_error(key, value, "a finite number")
    return float(value)


def _check_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _type_error(key, value, "a string")
    return value


_SCALARS: dict[type, Callable[[str, Any], Any]] = {
    bool: _check_bool,
    int: _check_int,
    float: _check_float,
    str: _check_str,
}
_ARTICLE = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _check_list(key: str, value: Any, container: type, item: type, rule: Rule) -> Any:
    if isinstance(value, str) and rule.scalar_ok and item is str:
        value = [value]
    if not isinstance(value, (list, tuple, set, frozenset)):
        expected = f"a list of {_ARTICLE.get(item, 'values')}"
        raise _type_error(key, value, ("a string or " if rule.scalar_ok else "") + expected)
    items = [_SCALARS[item](f"{key}[{i}]", v) for i, v in enumerate(value)]
    return container(items)


def _check_rule(key: str, value: Any, rule: Rule) -> None:
    if value is None:
        return
    is_list = isinstance(value, (list, tuple, frozenset))
    items = sorted(value) if isinstance(value, frozenset) else value if is_list else (value,)
    if rule.length is not None and len(items) != rule.length:
        raise ConfigError(f"{key} = {_plain(value)!r}: expected exactly {rule.length} values")
    bounds = rule.describe()
    for v in items:
        shown = f"{key} contains {v!r}" if is_list else f"{key} = {v!r}"
        if rule.choices is not None and v not in rule.choices:
            raise ConfigError(f"{shown}: expected one of {', '.join(map(str, rule.choices))}")
        if bounds and not (
            (rule.ge is None or v >= rule.ge)
            and (rule.gt is None or v > rule.gt)
            and (rule.le is None or v <= rule.le)
            and (rule.lt is None or v < rule.lt)
        ):
            raise ConfigError(f"{shown}: expected a value {bounds}")
        if rule.multiple_of is not None and v % rule.multiple_of:
            raise ConfigError(f"{shown}: expected a multiple of {rule.multiple_of}")


def _check_value(key: str, value: Any, tp: Any, rule_key: str | None = None) -> Any:
    """Type-check ``value`` against the field type ``tp``, then apply the field's rule."""
    rule = RULES.get(rule_key or key, Rule())
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):  # X | None
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = get_origin(tp), get_args(tp)
    if origin in (list, tuple, frozenset):
        out = _check_list(key, value, origin, args[0], rule)
    elif tp in _SCALARS:
        out = _SCALARS[tp](key, value)
    else:  # pragma: no cover - a field type this module does not know yet
        raise TypeError(f"no validator for {key}: {tp}")
    _check_rule(key, out, rule)
    return out


def _plain(value: Any) -> Any:
    """A TOML-writable copy: tuples → lists, frozensets → sorted lists."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    return value


def _unknown_keys(where: str, given: Mapping[str, Any], known: Sequence[str]) -> None:
    """Refuse keys a table does not have, suggesting the closest known one."""
    bad = [k for k in given if k not in known]
    if not bad:
        return
    parts = []
    for k in bad:
        match = difflib.get_close_matches(str(k), list(known), n=1)
        hint = f" (did you mean {where}.{match[0]}?)" if match else f" (known keys: {', '.join(known)})"
        parts.append(f"unknown key {where}.{k}{hint}")
    raise ConfigError("; ".join(parts))


def _as_table(key: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a table ([{key}]), got {value!r}")
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved field types (the modules use postponed annotations)."""
    return get_type_hints(cls)


# ----------------------------------------------------------------------------- table builders


def _build_plain(name: str, cls: type, table: Mapping[str, Any]) -> Any:
    """A dataclass table: unknown keys, types and rules, then the table's own cross-field check."""
    fields = [f.name for f in dataclasses.fields(cls)]
    _unknown_keys(name, table, fields)
    hints = _hints(cls)
    obj = cls(**{k: _check_value(f"{name}.{k}", v, hints[k]) for k, v in table.items()})
    for k in fields:
        rule = RULES.get(f"{name}.{k}")
        if rule is not None and rule.required and not getattr(obj, k):
            raise ConfigError(
                f"{name}.{k} is required: set {k} in the [{name}] table or pass --set {name}.{k}=..."
            )
    check = _TABLE_CHECKS.get(name)
    return check(obj) if check is not None else obj


def _build_lokr(name: str, cls: type, table: Mapping[str, Any]) -> LoKrConfig:
    fields = [f.name for f in dataclasses.fields(LoKrConfig)]
    _unknown_keys(name, table, fields)
    hints = _hints(LoKrConfig)
    data: dict[str, Any] = {}
    for k, v in table.items():
        data[k] = _build_rules(v) if k == "rules" else _check_value(f"lokr.{k}", v, hints[k])
    try:
        return LoKrConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(_name_key("lokr", str(e), fields)) from None


def _build_rules(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, (list, tuple)):
        raise _type_error("lokr.rules", value, "a list of tables ([[lokr.rules]])")
    fields = [f.name for f in dataclasses.fields(FactorRule)]
    hints = _hints(FactorRule)
    out = []
    for i, rule in enumerate(value):
        if isinstance(rule, FactorRule):
            rule = rule.to_dict()
        where = f"lokr.rules[{i}]"
        rule = _as_table(where, rule)
        _unknown_keys(where, rule, fields)
        out.append({k: _check_value(f"{where}.{k}", v, hints[k], f"lokr.rules.{k}") for k, v in rule.items()})
    return out


def _name_key(table: str, msg: str, fields: Sequence[str]) -> str:
    """Reword a LoKrConfig/CaptionConfig message so it names ``table.<key>``."""
    rule = re.match(r"(lokr\.rules\[\d+\]): LoKr rule: (\w+) (.*)", msg, re.S)
    if rule and rule.group(2) in {f.name for f in dataclasses.fields(FactorRule)}:
        return f"{rule.group(1)}.{rule.group(2)} {rule.group(3)}"
    if msg.startswith(f"{table}."):
        return msg
    rest = msg[len(table) + 2 :] if msg.startswith(f"{table}: ") else msg
    first = rest.split(" ", 1)[0]
    return f"{table}.{rest}" if first in fields else f"{table}: {rest}"


def _check_caption(c: CaptionConfig) -> CaptionConfig:
    try:
        c.validate()
    except ConfigError as e:
        raise ConfigError(_name_key("caption", str(e), [f.name for f in dataclasses.fields(c)])) from None
    return c


def _check_data(d: DataConfig) -> DataConfig:
    step = d.bucket_step
    for k in ("resolution", "min_bucket", "max_bucket"):
        if getattr(d, k) % step:
            raise ConfigError(f"data.{k} = {getattr(d, k)}: must be a multiple of data.bucket_step = {step}")
    if d.min_bucket > d.max_bucket:
        raise ConfigError(f"data.min_bucket = {d.min_bucket} is larger than data.max_bucket = {d.max_bucket}")
    if d.resolution < d.min_bucket:
        raise ConfigError(f"data.resolution = {d.resolution} is below data.min_bucket = {d.min_bucket}")
    try:  # the bucket module's own rules, should they grow
        BucketConfig(d.resolution, step, d.min_bucket, d.max_bucket).validate()
    except ConfigError as e:
        raise ConfigError(f"data: {e}") from None
    return d


def _check_diffusion(d: DiffusionConfig) -> DiffusionConfig:
    if d.min_timestep >= d.max_timestep:
        raise ConfigError(
            f"diffusion.min_timestep = {d.min_timestep} must be below diffusion.max_timestep = {d.max_timestep}"
            " (timesteps are drawn from [min, max))"
        )
    return d


def _check_optimizer(o: OptimizerConfig) -> OptimizerConfig:
    """Resolve the text-encoder learning rates, so the saved config always holds numbers."""
    return dataclasses.replace(
        o,
        te1_lr=o.unet_lr if o.te1_lr is None else o.te1_lr,
        te2_lr=o.unet_lr if o.te2_lr is None else o.te2_lr,
    )


def _check_train(t: TrainConfig) -> TrainConfig:
    if t.grad_accum is not None and t.global_batch is not None:
        raise ConfigError("give at most one of train.grad_accum and train.global_batch (the other follows from it)")
    if (t.max_steps > 0) == (t.epochs > 0):
        raise ConfigError(
            f"give exactly one of train.max_steps and train.epochs a value > 0 "
            f"(got max_steps = {t.max_steps}, epochs = {t.epochs})"
        )
    t.accumulation(1)  # a global batch must at least split into per-device batches
    return t


def _check_sample(s: SampleConfig) -> SampleConfig:
    if s.every > 0 and not s.prompts:
        raise ConfigError(f"sample.every = {s.every} needs sample.prompts (or set sample.every = 0)")
    return s


def _check_validation(v: ValidationConfig) -> ValidationConfig:
    if v.every > 0 and not v.path:
        raise ConfigError(f"validation.every = {v.every} needs validation.path (or set validation.every = 0)")
    if v.every > 0 and not v.timesteps:
        raise ConfigError("validation.timesteps must not be empty when validation is on")
    return v


_TABLE_CHECKS: dict[str, Callable[[Any], Any]] = {
    "caption": _check_caption,
    "data": _check_data,
    "diffusion": _check_diffusion,
    "optimizer": _check_optimizer,
    "train": _check_train,
    "sample": _check_sample,
    "validation": _check_validation,
}


# ----------------------------------------------------------------------------- the run config


@dataclass(frozen=True)
class RunConfig:
    """Every table of a run, validated; TOML tables are written in this order."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lokr: LoKrConfig = field(default_factory=LoKrConfig)
    data: DataConfig = field(default_factory=DataConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        """Validate a parsed TOML document; missing tables get their defaults."""
        data = _as_table("the config", data)
        unknown = [k for k in data if k not in TABLES]
        if unknown:
            raise ConfigError("; ".join(_unknown_table(str(k)) for k in unknown))
        tables = {}
        for name, cls_ in TABLES.items():
            build = _BUILDERS.get(name, _build_plain)
            tables[name] = build(name, cls_, _as_table(name, data.get(name, {})))
        return cls(**tables)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain TOML values (unset optional values left out)."""
        out: dict[str, Any] = {}
        for name in TABLES:
            obj = getattr(self, name)
            if isinstance(obj, LoKrConfig):
                out[name] = _plain(obj.to_dict())
            else:
                out[name] = _plain({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
        return out

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


TABLES: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}  # type: ignore[misc]
_BUILDERS: dict[str, Callable[[str, type, Mapping[str, Any]], Any]] = {"lokr": _build_lokr}


def _unknown_table(name: str) -> str:
    match = difflib.get_close_matches(name, list(TABLES), n=1)
    if match:
        return f"unknown table [{name}] (did you mean [{match[0]}]?)"
    owners = [t for t, cls in TABLES.items() if name in {f.name for f in dataclasses.fields(cls)}]
    if owners:
        return f"unknown table [{name}] (did you mean {owners[0]}.{name}? settings go inside tables)"
    return f"unknown table [{name}] (known tables: {', '.join(TABLES)})"


# ----------------------------------------------------------------------------- files and overrides

_OVERRIDE_EXAMPLE = "write table.key=value, e.g. --set train.seed=3 or --set model.path=/models/sdxl.safetensors"


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``table.key=value`` to a parsed TOML dict in place.

    The value is read as a TOML value (``3``, ``true``, ``[0.9, 0.95]``,
    ``"text"``); anything that is not valid TOML, or a non-string given for a
    string setting, is taken as the raw string, so paths need no quotes.
    """
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep:
        raise ConfigError(f"override {override!r} has no '=': {_OVERRIDE_EXAMPLE}")
    parts = key.split(".")
    if len(parts) < 2 or not all(p.strip() for p in parts):
        raise ConfigError(f"override {override!r} does not name a table and a key: {_OVERRIDE_EXAMPLE}")
    parts = [p.strip() for p in parts]
    raw = raw.strip()
    try:
        value: Any = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if _wants_string(parts) and not isinstance(value, (str, list)):
        value = raw
    node = data
    for i, p in enumerate(parts[:-1]):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a table")
    node[parts[-1]] = value


def _wants_string(parts: Sequence[str]) -> bool:
    """Whether ``table.key`` is a string (or list-of-strings) setting, so ``2024`` stays ``"2024"``."""
    if len(parts) != 2 or parts[0] not in TABLES:
        return False
    tp = _hints(TABLES[parts[0]]).get(parts[1])
    if tp is None:
        return False
    args = [a for a in get_args(tp) if a is not type(None)]
    return tp is str or args == [str]


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict, with one-line errors that name the file."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder; give the .toml file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a TOML run config (or none), apply ``--set`` overrides in order, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_toml(Path(path), "config file")
    for override in overrides:
        apply_override(data, override)
    return RunConfig.from_dict(data)


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(cfg.to_toml())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- help and run identity


@dataclass(frozen=True)
class FieldHelp:
    """One documented setting (for ``--help`` and the generated reference)."""

    name: str
    type: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, tuple, frozenset):
        item = args[0]
        return "list[table]" if item is FactorRule else f"list[{_type_name(item)}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:  # pragma: no cover - every table field has a default
        return None
    if isinstance(value, tuple) and value and isinstance(value[0], FactorRule):
        return [r.to_dict() for r in value]
    return _plain(value)


def _fields_help(table: str, cls: type, helps: Mapping[str, str] | None) -> list[FieldHelp]:
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        text = helps.get(f.name, "") if helps is not None else f.metadata.get("help", "")
        rule = RULES.get(f"{table}.{f.name}")
        out.append(FieldHelp(f.name, _type_name(hints[f.name]), _default(f), text, rule.choices if rule else None))
    return out


def schema() -> dict[str, list[FieldHelp]]:
    """Every table's fields with type, default, help and choices (``lokr.rules``: one rule table)."""
    out: dict[str, list[FieldHelp]] = {}
    for name, cls in TABLES.items():
        helps = {"lokr": LOKR_HELP, "caption": CAPTION_HELP}.get(name)
        out[name] = _fields_help(name, cls, helps)
        if name == "lokr":
            out["lokr.rules"] = _fields_help("lokr.rules", FactorRule, LOKR_RULE_HELP)
    return out


#: Settings that never change a run's weights (paths of outputs and caches, I/O
#: cadence, the split of the global batch, previews, validation, labels).
_NOT_RUN_DEFINING: frozenset[str] = frozenset(
    {
        "model.allow_pickle",
        "lokr.preset",  # a starting point; the resolved lokr fields say what it meant
        "train.output_dir",
        "train.save_every",
        "train.keep_last",
        "train.stop_after",
        "train.log_every",
        "train.batch_size",
        "train.grad_accum",
        "train.global_batch",
        "data.num_workers",
        "data.cache_dir",
        "data.cache_latents",
        "data.cache_text",
    }
)
_NOT_RUN_DEFINING_TABLES: frozenset[str] = frozenset({"sample", "validation"})


def run_defining_dict(cfg: RunConfig, num_processes: int) -> dict[str, Any]:
    """Flat ``table.key → value`` of everything that decides the trained weights.

    A resume whose dict differs would silently train another run, so the
    trainer refuses it.  The global batch counts, its split does not
    (DESIGN.md §6), hence ``train.resolved_global_batch``.
    """
    flat: dict[str, Any] = {}
    for table, values in cfg.to_dict().items():
        if table in _NOT_RUN_DEFINING_TABLES:
            continue
        for k, v in values.items():
            key = f"{table}.{k}"
            if key not in _NOT_RUN_DEFINING:
                flat[key] = v
    flat["train.resolved_global_batch"] = cfg.train.accumulation(num_processes)[1]
    return flat
