"""LoKr adapter files in the interop format (DESIGN.md §4).

One ``.safetensors`` file that ComfyUI, A1111/Forge, LyCORIS and kohya
sd-scripts load as it is: per module ``<name>.alpha`` (a 0-d **float32**
tensor whatever the weights' dtype, because a full-matrix alpha of 100000 is
``inf`` in fp16), optional ``<name>.dora_scale``, ``lokr_w1`` or
``lokr_w1_a``/``lokr_w1_b``, ``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b`` (+
``lokr_t2``), in LyCORIS' layouts, and string metadata (``ss_*``,
``modelspec.*``, ``lokr_trainer.*``).

The delta weight is computed here, from the file's tensors, by the formula
every UI applies: ΔW = s · kron(W1, W2) reshaped to the layer's weight shape,
s = alpha / r where r is the rank of the decomposed factor (w2's if both are
decomposed, as ComfyUI and A1111 read it), s = 1 when both factors are full.
We never use lycoris-lora 4.1.3's ``get_diff_weight``/``merge_to``: they apply
s twice.

Light on purpose: torch and the key maps only, so the merge tool can read
adapters without importing diffusers or transformers.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from lokr_trainer.errors import CorruptFileError, KeyMapError, ShapeMismatchError
from lokr_trainer.lokr.names import ModuleTable, normalize_lokr_name
from lokr_trainer.safetensors_io import PlannedTensor, SafetensorsReader, parse_dtype, write_safetensors
from lokr_trainer.sdxl.keys import SDXL_UNET_LAYOUT, UNetLayout

logger = logging.getLogger(__name__)

#: Tensor names of one LoKr module, in the order LyCORIS writes them.
TENSOR_ORDER: tuple[str, ...] = (
    "alpha",
    "dora_scale",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
)
_KNOWN = frozenset(TENSOR_ORDER)
#: Tensors that mark another algorithm's module (LoRA/LoCon, LoHa, …).
#: What a file holds when it has no LoKr module: tensor-name markers → a description.
_FOREIGN_KINDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("lora_up", "lora_down", "lora_A", "lora_B"), "a LoRA (lora_up/lora_down), not a LoKr"),
    (("hada_w1_a", "hada_w1_b"), "a LoHa, not a LoKr"),
    (("oft_blocks", "oft_diag"), "an OFT/BOFT adapter, not a LoKr"),
    (("diff",), "a full-weight difference (LyCORIS 'full'), not a LoKr"),
)
_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "conditioner.embedders.", "first_stage_model.", "down_blocks.", "text_model.")


def describe_non_lokr(keys: Iterable[str]) -> str | None:
    """What a file without any LoKr module is (a LoRA, a checkpoint, …), for an error message that says so."""
    keys = list(keys)
    if any(k.endswith((".lokr_w1", ".lokr_w1_a")) for k in keys):
        return None
    if keys and sum(k.startswith(_CHECKPOINT_PREFIXES) for k in keys) * 2 > len(keys):
        return "a model checkpoint, not a LoKr adapter (pass it as --base)"
    tensor_names = {k.rpartition(".")[2] for k in keys} | {k.rsplit(".", 2)[-2] for k in keys if k.count(".") >= 2}
    for markers, what in _FOREIGN_KINDS:
        if tensor_names & set(markers):
            return what
    return None

#: modelspec / ss values every SDXL LoRA-family file carries (research/lycoris.md §6).
SS_BASE_MODEL_VERSION = "sdxl_base_v1-0"


# --------------------------------------------------------------------------- one module


@dataclass
class LoKrModuleWeights:
    """The tensors of one LoKr module as stored in a file (any dtype)."""

    name: str
    tensors: dict[str, torch.Tensor]
    #: The module's name as the file spells it, when that differs from ``name``
    #: (an SD1.x-style ``lora_te_`` or a diffusers-path name): messages quote the file.
    stored_name: str = ""

    @property
    def label(self) -> str:
        """The name for messages: the file's spelling first, then ours."""
        if self.stored_name and self.stored_name != self.name:
            return f"{self.stored_name} (read as {self.name})"
        return self.name

    # -- structure -------------------------------------------------------------------

    @property
    def w1_full(self) -> bool:
        return "lokr_w1" in self.tensors

    @property
    def w2_full(self) -> bool:
        return "lokr_w2" in self.tensors

    @property
    def tucker(self) -> bool:
        return "lokr_t2" in self.tensors

    @property
    def rank(self) -> int | None:
        """The rank consumers divide alpha by: w2_b's rows, else w1_b's, None when both are full."""
        if not self.w2_full:
            return int(self.tensors["lokr_w2_b"].shape[0])
        if not self.w1_full:
            return int(self.tensors["lokr_w1_b"].shape[0])
        return None

    @property
    def alpha(self) -> float | None:
        a = self.tensors.get("alpha")
        return None if a is None else float(a.float().reshape(-1)[0])

    @property
    def scale(self) -> float:
        """alpha / r with a decomposed factor (ComfyUI/A1111/LyCORIS forward), else 1."""
        r, a = self.rank, self.alpha
        return a / r if (r is not None and a is not None) else 1.0

    def w1(self) -> torch.Tensor:
        t = self.tensors
        if self.w1_full:
            return t["lokr_w1"].float()
        return t["lokr_w1_a"].float() @ t["lokr_w1_b"].float()

    def w2(self) -> torch.Tensor:
        """The second factor; 2-D (conv kernel flattened into columns) or 4-D (full conv / Tucker)."""
        t = self.tensors
        if self.w2_full:
            return t["lokr_w2"].float()
        a, b = t["lokr_w2_a"].float(), t["lokr_w2_b"].float()
        if self.tucker:  # LyCORIS' Tucker layout: w2_a is (r, out_k), w2_b (r, in_n)
            return torch.einsum("i j ..., i p, j r -> p r ...", t["lokr_t2"].float(), a, b)
        return a @ b.reshape(b.shape[0], -1)

    def kron_shape(self) -> tuple[int, int]:
        """(out, in·k) of the 2-D kron, for shape checks without computing anything."""
        t = self.tensors
        if self.w1_full:
            a, c = t["lokr_w1"].shape
        else:
            a, c = t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1]
        if self.w2_full:
            w2s = tuple(t["lokr_w2"].shape)
            b, d = w2s[0], math.prod(w2s[1:])
        elif self.tucker:
            k = math.prod(t["lokr_t2"].shape[2:])
            b, d = t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1] * k
        else:
            b, d = t["lokr_w2_a"].shape[0], math.prod(t["lokr_w2_b"].shape[1:])
        return int(a * b), int(c * d)

    def fits(self, weight_shape: tuple[int, ...]) -> bool:
        """Does ΔW have the layer's output rows and element count?"""
        out, cols = self.kron_shape()
        return len(weight_shape) >= 2 and out == weight_shape[0] and out * cols == math.prod(weight_shape)

    # -- maths -----------------------------------------------------------------------

    def delta_weight(self, weight_shape: tuple[int, ...]) -> torch.Tensor:
        """fp32 ΔW = s · kron(W1, W2) reshaped to ``weight_shape`` (no multiplier, no DoRA).

        For a conv, W2 carries the kernel dims: a 4-D W2 (full conv, Tucker)
        is krond with W1 broadcast over the kernel, a 2-D W2 holds the kernel
        flattened into its columns; both give the same (out, in, kh, kw).
        """
        weight_shape = tuple(int(s) for s in weight_shape)
        if not self.fits(weight_shape):
            raise ShapeMismatchError(
                f"LoKr module {self.label}: factors give a {self.kron_shape()} delta, "
                f"which does not fit the weight {list(weight_shape)}"
            )
        w1, w2 = self.w1(), self.w2()
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        delta = torch.kron(w1, w2.contiguous())
        scale = self.scale
        if scale != 1.0:
            delta = delta * scale
        return delta.reshape(weight_shape)

    def apply_to_weight(self, weight: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        """fp32 W' for this module: W + m·ΔW, or LyCORIS' DoKr rescale when the file has ``dora_scale``.

        DoKr (LyCORIS, ``wd_on_out`` from dora_scale's shape):
        W' = (W + ΔW) · (m · (dora_scale / ‖W + ΔW‖ − 1) + 1).  ComfyUI and
        A1111 each normalise DoRA differently; this is the trainer's forward.
        """
        w = weight.float()
        delta = self.delta_weight(tuple(weight.shape))
        dora = self.tensors.get("dora_scale")
        if dora is None:
            return w + multiplier * delta
        merged = w + delta
        dora = dora.float()
        norm_dims = merged.dim() - 1
        if dora.shape[0] == merged.shape[0] and (dora.dim() < 2 or dora.shape[1] == 1):  # per output row
            norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(merged.shape[0], *[1] * norm_dims)
        else:  # per input column
            norm = (
                merged.transpose(0, 1)
                .reshape(merged.shape[1], -1)
                .norm(dim=1, keepdim=True)
                .reshape(merged.shape[1], *[1] * norm_dims)
                .transpose(0, 1)
            )
        factor = dora / (norm + torch.finfo(torch.float32).eps)
        if multiplier != 1:
            factor = multiplier * (factor - 1) + 1
        return merged * factor

    def validate(self, where: str | Path | None = None) -> None:
        """Raise :class:`CorruptFileError` when the tensors are not one consistent LoKr module."""
        t = self.tensors

        def bad(problem: str) -> CorruptFileError:
            return CorruptFileError(where, f"LoKr module {self.label}: {problem}")

        unknown = sorted(set(t) - _KNOWN)
        if unknown:
            raise bad(f"unknown tensors {unknown}")
        if not (("lokr_w1" in t) ^ ("lokr_w1_a" in t and "lokr_w1_b" in t)):
            raise bad("needs lokr_w1 or both lokr_w1_a and lokr_w1_b (and not both forms)")
        if not (("lokr_w2" in t) ^ ("lokr_w2_a" in t and "lokr_w2_b" in t)):
            raise bad("needs lokr_w2 or both lokr_w2_a and lokr_w2_b (and not both forms)")
        if "lokr_t2" in t and "lokr_w2" in t:
            raise bad("lokr_t2 (Tucker) goes with lokr_w2_a/lokr_w2_b, not with lokr_w2")
        if "alpha" in t and t["alpha"].numel() != 1:
            raise bad(f"alpha must be a scalar, got shape {list(t['alpha'].shape)}")
        try:
            if "lokr_w1_a" in t:
                a, b = t["lokr_w1_a"], t["lokr_w1_b"]
                if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
                    raise ValueError(f"lokr_w1_a {list(a.shape)} @ lokr_w1_b {list(b.shape)}")
            elif t["lokr_w1"].dim() != 2:
                raise ValueError(f"lokr_w1 must be 2-D, got {list(t['lokr_w1'].shape)}")
            if "lokr_t2" in t:
                t2, a, b = t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]
                if a.dim() != 2 or b.dim() != 2 or t2.dim() < 2 or t2.shape[0] != a.shape[0] or t2.shape[1] != b.shape[0]:
                    raise ValueError(f"lokr_t2 {list(t2.shape)}, lokr_w2_a {list(a.shape)}, lokr_w2_b {list(b.shape)}")
            elif "lokr_w2_a" in t:
                a, b = t["lokr_w2_a"], t["lokr_w2_b"]
                if a.dim() != 2 or b.dim() < 2 or a.shape[1] != b.shape[0]:
                    raise ValueError(f"lokr_w2_a {list(a.shape)} @ lokr_w2_b {list(b.shape)}")
            elif t["lokr_w2"].dim() < 2:
                raise ValueError(f"lokr_w2 must be at least 2-D, got {list(t['lokr_w2'].shape)}")
        except ValueError as e:
            raise bad(f"inconsistent factor shapes: {e}") from None
        for name, x in t.items():
            if not x.is_floating_point():
                raise bad(f"{name} is {str(x.dtype).replace('torch.', '')}; LoKr tensors are floating point")
            if name != "alpha" and x.numel() == 0:
                raise bad(f"{name} has shape {list(x.shape)}: a zero-size factor (rank 0) changes nothing")
        if "dora_scale" in t:
            out, cin = self.kron_shape()
            d = t["dora_scale"]
            ones = [n for n in d.shape if n != 1]
            if d.dim() < 2 or len(ones) > 1 or d.numel() not in (out, cin):
                raise bad(f"dora_scale has shape {list(d.shape)}; DoKr stores one scale per output (or input) "
                          f"channel: ({out}, 1, …) or (1, {cin})")


# --------------------------------------------------------------------------- one file


@dataclass
class LoKrFile:
    """A LoKr adapter: modules keyed by normalised LDM-spelling name, and metadata."""

    path: Path | None
    modules: dict[str, LoKrModuleWeights]
    metadata: dict[str, str] = field(default_factory=dict)
    #: "name (reason)" of modules left out with ``skip_unknown=True``.
    skipped: list[str] = field(default_factory=list)

    def save(self, path: str | Path, *, dtype: torch.dtype | None = None, overwrite: bool = True) -> Path:
        """Write the file back (same tensors and metadata unless ``dtype`` recasts the weights)."""
        return write_lokr(path, {k: m.tensors for k, m in self.modules.items()}, self.metadata, dtype=dtype, overwrite=overwrite)


def group_module_tensors(keys: Iterable[str]) -> dict[str, list[str]]:
    """``module.tensor`` keys → module → its tensor names (the one grouping of LoKr file keys)."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        module, _, tensor = key.rpartition(".")
        if not module:
            module, tensor = key, ""
        groups.setdefault(module, []).append(tensor)
    return groups


def load_lokr(
    path: str | Path,
    *,
    layout: UNetLayout = SDXL_UNET_LAYOUT,
    table: ModuleTable | None = None,
    skip_unknown: bool = False,
    warn_skipped: bool = True,
) -> LoKrFile:
    """Read a LoKr ``.safetensors`` written by us, LyCORIS, kohya or another trainer.

    Module names are normalised to the LDM spelling (diffusers-path UNet names,
    ``lycoris_``, ``lora_te_`` and TE names without ``text_model`` are
    accepted).  Modules that are not LoKr, or whose names no SDXL module has,
    are an error naming them; ``skip_unknown=True`` skips them with a warning.
    Tensors keep their stored dtype (so a load/save round trip is exact).
    """
    path = Path(path)
    unknown: list[str] = []
    foreign: list[str] = []
    modules: dict[str, LoKrModuleWeights] = {}
    origin: dict[str, str] = {}
    with SafetensorsReader(path) as reader:
        metadata = dict(reader.header.metadata)
        for raw_name, tensor_names in group_module_tensors(reader.keys()).items():
            if not any(t in ("lokr_w1", "lokr_w1_a") for t in tensor_names):
                foreign.append(raw_name)
                continue
            try:
                name = normalize_lokr_name(raw_name, layout, table)
            except KeyMapError as e:
                unknown.append(f"{raw_name} ({e})")
                continue
            if name in modules:
                raise CorruptFileError(path, f"modules {origin[name]!r} and {raw_name!r} are the same module {name}")
            tensors = {t: reader.get(f"{raw_name}.{t}") for t in tensor_names}
            module = LoKrModuleWeights(name, tensors, stored_name=raw_name)
            module.validate(path)
            modules[name] = module
            origin[name] = raw_name
    problems: list[str] = []
    if foreign:
        problems.append(f"{len(foreign)} modules are not LoKr (LoRA/LoHa/other): {', '.join(sorted(foreign)[:8])}")
    if unknown:
        problems.append(f"{len(unknown)} module names match no SDXL module: {'; '.join(sorted(unknown)[:8])}")
    msg = "; ".join(problems)
    if not modules:
        with SafetensorsReader(path) as reader:
            what = describe_non_lokr(reader.keys())
        if what is not None:
            raise CorruptFileError(path, f"this file is {what}")
        raise CorruptFileError(path, "no usable LoKr module in this file" + (f": {msg}" if msg else " (no lokr_w1/lokr_w1_a tensors)"))
    if problems:
        if not skip_unknown:
            raise CorruptFileError(path, msg, "pass skip_unknown=True to load the rest and skip these")
        if warn_skipped:  # the merge lists them in its own report instead
            logger.warning("%s: skipping %s", path, msg)
    skipped = [f"{n} (not a LoKr module)" for n in sorted(foreign)] + sorted(unknown)
    return LoKrFile(path=path, modules=modules, metadata=metadata, skipped=skipped)


def write_lokr(
    path: str | Path,
    modules: Mapping[str, Mapping[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = True,
) -> Path:
    """Write modules' tensors atomically; ``alpha`` always as a 0-d float32 tensor.

    ``dtype`` casts every other floating tensor (None keeps each as it is).
    Modules are written in the given order, tensors in LyCORIS' order.
    """
    plan: list[PlannedTensor] = []
    items: list[tuple[str, torch.Tensor]] = []
    for name, tensors in modules.items():
        extra = sorted(set(tensors) - _KNOWN)
        if extra:
            raise CorruptFileError(path, f"LoKr module {name}: unknown tensors {extra}")
        for tname in TENSOR_ORDER:
            if tname not in tensors:
                continue
            t = tensors[tname].detach()
            if tname == "alpha":
                t = t.to(torch.float32).reshape(())
            elif dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            key = f"{name}.{tname}"
            plan.append(PlannedTensor(key, t.dtype, tuple(t.shape)))
            items.append((key, t))
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return write_safetensors(path, plan, iter(items), meta, overwrite=overwrite)


def save_lokr(
    network: Any,
    path: str | Path,
    *,
    dtype: torch.dtype | str = torch.float16,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    extra_modules: Mapping[str, LoKrModuleWeights] | None = None,
) -> Path:
    """Save a :class:`~lokr_trainer.lokr.attach.LoKrNetwork` in the interop format.

    ``dtype`` is a torch dtype or ``"fp16"``/``"bf16"``/``"fp32"``;
    ``metadata`` adds or overrides keys of the network's own (``ss_*``,
    ``modelspec.*``, ``lokr_trainer.*``); values are turned into strings.  An
    existing file is replaced only with ``overwrite=True``, like the merge.
    ``extra_modules`` (modules the network does not hold, e.g. the frozen
    text-encoder modules of a starting file) are written after its own.
    """
    meta = dict(network.file_metadata())
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    tensors = network.file_tensors()
    clash = sorted(set(tensors) & set(extra_modules or {}))
    if clash:
        raise ValueError(f"extra_modules repeats modules of the network: {clash[:3]}")
    tensors.update({name: m.tensors for name, m in (extra_modules or {}).items()})
    return write_lokr(path, tensors, meta, dtype=parse_dtype(dtype), overwrite=overwrite)


def json_dumps(value: Any) -> str:
    """Compact, key-sorted JSON, so that equal values give equal metadata strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
