"""Which modules get LoKr, and with which settings: ``LoKrConfig`` and presets.

A run's ``[lokr]`` TOML table becomes a :class:`LoKrConfig`.  Selection is
(1) a named target preset over module *kinds* (attention, feed-forward,
ResNet convs, … see :data:`lokr_trainer.lokr.names.KINDS`), plus
(2) ``include``/``exclude`` glob patterns on module names, restricted to the
enabled components.  Per-module settings come from an ordered list of
:class:`FactorRule`: the **first** rule that matches a module decides its
settings; fields a rule leaves unset fall back to the config's defaults.

Glob patterns (``fnmatch``, case-sensitive) see every spelling of a module,
so users can write whichever they know:

* the file name ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``
* the dotted canonical path with its component, ``unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q``
  or ``te2.text_model.encoder.layers.31.mlp.fc1``
* for the UNet, the diffusers path ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``

Errors are :class:`~lokr_trainer.errors.ConfigError`: an enabled component
on which nothing is selected ("0 modules" is the classic silent failure),
and a text-encoder layer whose attention is selected only in part (A1111
applies bigG attention only when q, k, v and out are all present).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from lokr_trainer.errors import ConfigError, KeyMapError
from lokr_trainer.lokr.names import ADAPTER_COMPONENTS, KINDS, ModuleEntry, ModuleTable, group_te_attention
from lokr_trainer.sdxl.keys import unet_ldm_to_diffusers

#: Forward implementations; all give the same outputs and gradients (see forward.py).
FORWARD_MODES: tuple[str, ...] = ("auto", "bypass", "rebuild", "merged")

#: Target presets: the module kinds each selects.
TARGET_PRESETS: dict[str, frozenset[str]] = {
    # attention projections only
    "attn": frozenset({"attn", "te_attn"}),
    # transformer blocks: attention, feed-forward and proj_in/out; TE attention + MLP
    "attn-mlp": frozenset({"attn", "ff", "proj", "te_attn", "te_mlp"}),
    # every Linear/Conv of the UNet (ResNet convs, skips, samplers, conv_in/out,
    # time and size embeddings) and the TE attention + MLP
    "full": frozenset(KINDS),
}


@dataclass(frozen=True)
class FactorRule:
    """Settings for the modules one rule matches (first matching rule wins).

    A rule matches a module when *all* of its given criteria do: ``pattern``
    (glob or list of globs, any of which may match), ``kind`` (list of kinds)
    and ``component`` (list of ``unet``/``te1``/``te2``).  ``skip = true``
    deselects the modules it matches.
    """

    pattern: tuple[str, ...] = ()
    kind: tuple[str, ...] = ()
    component: tuple[str, ...] = ()
    factor: int | None = None
    full_matrix: bool | None = None
    dim: int | None = None
    alpha: float | None = None
    decompose_both: bool | None = None
    use_tucker: bool | None = None
    weight_decompose: bool | None = None
    unbalanced_factorization: bool | None = None
    forward_mode: str | None = None
    skip: bool = False

    def __post_init__(self) -> None:
        for name in ("pattern", "kind", "component"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        if not (self.pattern or self.kind or self.component):
            raise ConfigError("a LoKr rule needs at least one of pattern, kind, component")
        bad = [k for k in self.kind if k not in KINDS]
        if bad:
            raise ConfigError(f"LoKr rule: unknown kind(s) {bad}; known kinds: {', '.join(KINDS)}")
        bad = [c for c in self.component if c not in ADAPTER_COMPONENTS]
        if bad:
            raise ConfigError(f"LoKr rule: unknown component(s) {bad}; use unet, te1, te2")
        _check_settings(self, "LoKr rule")

    def matches(self, entry: ModuleEntry, spellings: Sequence[str]) -> bool:
        if self.component and entry.component not in self.component:
            return False
        if self.kind and entry.kind not in self.kind:
            return False
        if self.pattern and not any(fnmatch.fnmatchcase(s, p) for p in self.pattern for s in spellings):
            return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items() if v not in (None, (), False)}


def _check_settings(obj: Any, where: str) -> None:
    factor = getattr(obj, "factor", None)
    if factor is not None and (not isinstance(factor, int) or isinstance(factor, bool) or (factor < 1 and factor != -1)):
        raise ConfigError(f"{where}: factor must be a positive integer or -1 (most balanced split), got {factor!r}")
    dim = getattr(obj, "dim", None)
    if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim < 1):
        raise ConfigError(f"{where}: dim must be a positive integer, got {dim!r}")
    alpha = getattr(obj, "alpha", None)
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
        raise ConfigError(f"{where}: alpha must be a positive number, got {alpha!r}")
    mode = getattr(obj, "forward_mode", None)
    if mode is not None and mode not in FORWARD_MODES:
        raise ConfigError(f"{where}: forward_mode must be one of {', '.join(FORWARD_MODES)}, got {mode!r}")


@dataclass(frozen=True)
class ModuleSettings:
    """The effective settings of one module after rules and defaults."""

    factor: int
    full_matrix: bool
    dim: int
    alpha: float
    decompose_both: bool
    use_tucker: bool
    weight_decompose: bool
    unbalanced_factorization: bool
    forward_mode: str
    rule: int | None = None  # index of the rule that matched, None for the defaults


@dataclass(frozen=True)
class LoKrConfig:
    """The ``[lokr]`` table: what to wrap and how.

    Defaults are the recipe the Kohaku XL Delta card describes in spirit:
    full-matrix LoKr (both Kronecker factors dense, scale 1, no rank), factor 8,
    on attention + feed-forward of the UNet and both text encoders.
    """

    components: tuple[str, ...] = ADAPTER_COMPONENTS
    targets: str = "attn-mlp"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    factor: int = 8
    full_matrix: bool = True
    dim: int = 16  # rank of the decomposed factor when full_matrix is false
    alpha: float = 8.0  # scale = alpha / dim when a factor is decomposed
    decompose_both: bool = False
    use_tucker: bool = False
    weight_decompose: bool = False  # "DoKr" (LyCORIS' DoRA-style magnitude)
    unbalanced_factorization: bool = False
    dropout: float = 0.0  # on the adapter's output (bypass forward only)
    rank_dropout: float = 0.0  # LyCORIS: drops rows of ΔW (rebuild/merged forward only)
    rank_dropout_scale: bool = False
    module_dropout: float = 0.0  # skip the whole adapter of a module with this probability
    multiplier: float = 1.0
    forward_mode: str = "auto"
    rules: tuple[FactorRule, ...] = ()
    preset: str | None = None

    def __post_init__(self) -> None:
        comps = self.components
        if isinstance(comps, str):
            comps = (comps,)
        object.__setattr__(self, "components", tuple(comps))
        for name in ("include", "exclude"):
            v = getattr(self, name)
            object.__setattr__(self, name, (v,) if isinstance(v, str) else tuple(v))
        rules = tuple(r if isinstance(r, FactorRule) else _rule_from_dict(r, i) for i, r in enumerate(self.rules))
        object.__setattr__(self, "rules", rules)
        bad = [c for c in self.components if c not in ADAPTER_COMPONENTS]
        if bad or not self.components:
            raise ConfigError(f"lokr.components must be a non-empty subset of unet, te1, te2, got {list(self.components)}")
        if self.targets not in TARGET_PRESETS:
            raise ConfigError(f"lokr.targets must be one of {', '.join(TARGET_PRESETS)}, got {self.targets!r}")
        _check_settings(self, "lokr")
        for name in ("dropout", "rank_dropout", "module_dropout"):
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ConfigError(f"lokr.{name} must be in [0, 1), got {p!r}")
        if isinstance(self.multiplier, bool) or not isinstance(self.multiplier, (int, float)):
            raise ConfigError(f"lokr.multiplier must be a number, got {self.multiplier!r}")

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoKrConfig":
        """From the ``[lokr]`` TOML table; ``preset = "name"`` starts from a named preset."""
        data = dict(data)
        preset = data.pop("preset", None)
        if preset is not None:
            return cls.from_preset(preset, **data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"lokr: unknown setting(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "LoKrConfig":
        """A named preset (:data:`PRESETS`) with some settings replaced."""
        if name not in PRESETS:
            raise ConfigError(f"unknown LoKr preset {name!r}; presets: {', '.join(PRESETS)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"lokr: unknown setting(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**{**PRESETS[name], "preset": name, **overrides})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "rules":
                v = [r.to_dict() for r in v]
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    # -- selection --------------------------------------------------------------------

    def defaults(self) -> ModuleSettings:
        return ModuleSettings(
            factor=self.factor,
            full_matrix=self.full_matrix,
            dim=self.dim,
            alpha=float(self.alpha),
            decompose_both=self.decompose_both,
            use_tucker=self.use_tucker,
            weight_decompose=self.weight_decompose,
            unbalanced_factorization=self.unbalanced_factorization,
            forward_mode=self.forward_mode,
        )

    def resolve(self, table: ModuleTable) -> list[tuple[ModuleEntry, ModuleSettings]]:
        """The selected modules of ``table`` with their settings, in table order."""
        kinds = TARGET_PRESETS[self.targets]
        base = self.defaults()
        chosen: list[tuple[ModuleEntry, ModuleSettings]] = []
        for entry in table.entries:
            if entry.component not in self.components:
                continue
            names = spellings(entry, table)
            selected = entry.kind in kinds or any(fnmatch.fnmatchcase(s, p) for p in self.include for s in names)
            if selected and any(fnmatch.fnmatchcase(s, p) for p in self.exclude for s in names):
                selected = False
            if not selected:
                continue
            settings = base
            for i, rule in enumerate(self.rules):
                if rule.matches(entry, names):
                    if rule.skip:
                        settings = None
                    else:
                        settings = dataclasses.replace(
                            base,
                            rule=i,
                            **{
                                k: getattr(rule, k)
                                for k in (
                                    "factor",
                                    "full_matrix",
                                    "dim",
                                    "alpha",
                                    "decompose_both",
                                    "use_tucker",
                                    "weight_decompose",
                                    "unbalanced_factorization",
                                    "forward_mode",
                                )
                                if getattr(rule, k) is not None
                            },
                        )
                        if rule.alpha is not None:
                            settings = dataclasses.replace(settings, alpha=float(rule.alpha))
                    break
            if settings is not None:
                chosen.append((entry, settings))
        self._check(chosen, table)
        return chosen

    def _check(self, chosen: list[tuple[ModuleEntry, ModuleSettings]], table: ModuleTable) -> None:
        counts = {c: 0 for c in self.components}
        for entry, _ in chosen:
            counts[entry.component] += 1
        empty = [c for c, n in counts.items() if n == 0]
        if empty:
            raise ConfigError(
                f"LoKr selects no module on enabled component(s) {', '.join(empty)} "
                f"(targets={self.targets!r}, include={list(self.include)}, exclude={list(self.exclude)}, "
                f"{len(self.rules)} rules); fix the patterns or drop the component from lokr.components"
            )
        picked = {e.lokr_name for e, _ in chosen}
        partial = []
        for (comp, layer), group in group_te_attention(table.entries).items():
            n = sum(e.lokr_name in picked for e in group)
            if 0 < n < len(group):
                partial.append(f"{comp} {layer}")
        if partial:
            raise ConfigError(
                "text-encoder attention must get q, k, v and out together (A1111 ignores bigG attention "
                f"otherwise); partly selected in: {', '.join(partial[:6])}" + (" …" if len(partial) > 6 else "")
            )


def spellings(entry: ModuleEntry, table: ModuleTable) -> tuple[str, ...]:
    """The names a glob pattern is matched against (see module docstring)."""
    names = [entry.lokr_name, entry.dotted]
    if entry.component == "unet":
        try:
            names.append("unet." + unet_ldm_to_diffusers(entry.path, table.layout))
        except KeyMapError:  # pragma: no cover - every table entry converts
            pass
    return tuple(names)


def _rule_from_dict(data: Any, index: int) -> FactorRule:
    if not isinstance(data, Mapping):
        raise ConfigError(f"lokr.rules[{index}] must be a table, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(FactorRule)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"lokr.rules[{index}]: unknown setting(s) {unknown}; known: {', '.join(sorted(known))}")
    try:
        return FactorRule(**data)
    except ConfigError as e:
        raise ConfigError(f"lokr.rules[{index}]: {e}") from None


# --------------------------------------------------------------------------- presets

#: Named LoKr presets: ``LoKrConfig.from_preset(name, **overrides)``.
PRESETS: dict[str, dict[str, Any]] = {
    "attn": {"targets": "attn", "factor": 8, "full_matrix": True},
    "attn-mlp": {"targets": "attn-mlp", "factor": 8, "full_matrix": True},
    "full": {"targets": "full", "factor": 8, "full_matrix": True},
    # Kohaku XL Delta: full-matrix LoKr, factors 2-8 per module kind, UNet and
    # both TEs trained, fp16 file under 800 MB on SDXL (734.8 MB; docs/lokr.md).
    "kohaku-xl-delta": {
        "components": ADAPTER_COMPONENTS,
        "targets": "full",
        "full_matrix": True,
        "factor": 8,  # ResNet convs, skips, samplers, time/size embeddings
        "rules": (
            FactorRule(kind=("attn",), factor=2),  # UNet self/cross-attention: the most capacity
            FactorRule(kind=("ff", "proj"), factor=4),
            FactorRule(kind=("conv_in", "conv_out"), factor=2),  # 4-channel ends: tiny either way
            FactorRule(component=("te1", "te2"), factor=4),
        ),
    },
}

