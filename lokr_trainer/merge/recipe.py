"""What a merge does, as one value: from Python, the command line or a TOML file.

A recipe file holds the command-line options under the same names
(underscores or dashes), so a command line and a recipe are interchangeable::

    out = "delta-base.safetensors"
    base = ["gamma-rev2.safetensors", "beta7.safetensors"]
    weights = [0.5, 0.5]
    restore_embeddings = "sd_xl_base_1.0.safetensors"
    lokr = ["delta.safetensors:1.0"]          # or [{path = "...", multiplier = 1.0}]
    dtype = "fp16"

Relative paths in a recipe file are relative to the file's folder, so a
recipe and its inputs can move together.  Unknown keys are errors (a typo must
not silently drop an input).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from lokr_trainer.errors import ConfigError
from lokr_trainer.safetensors_io import DTYPE_NAMES, parse_dtype  # the one table of dtype names

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


@dataclass(frozen=True)
class LoKrInput:
    """One LoKr file and the multiplier m of W' = W + m·ΔW."""

    path: Path
    multiplier: float = 1.0

    @classmethod
    def parse(cls, spec: "str | Path | LoKrInput | Mapping[str, Any]", base_dir: Path | None = None) -> "LoKrInput":
        """``PATH``, ``PATH:MULT`` (the last colon, if what follows is a number) or a mapping."""
        if isinstance(spec, LoKrInput):
            return spec
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"path", "multiplier", "mult"}
            if unknown or "path" not in spec:
                raise ConfigError(f"lokr entry {dict(spec)!r}: expected keys path and multiplier")
            mult = spec.get("multiplier", spec.get("mult", 1.0))
            return cls(_resolve(spec["path"], base_dir), _number(mult, f"multiplier of {spec['path']}"))
        text = str(spec)
        path, mult = text, 1.0
        head, sep, tail = text.rpartition(":")
        if sep and head and not tail.startswith(("/", "\\")):
            try:
                mult = float(tail)
                path = head
            except ValueError:
                if _resolve(head, base_dir).exists() and not _resolve(text, base_dir).exists():
                    raise ConfigError(f"{text}: the multiplier {tail!r} after ':' is not a number") from None
        return cls(_resolve(path, base_dir), _number(mult, f"multiplier of {path}"))


def _number(x: Any, what: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: {x!r} is not a number") from None
    if not math.isfinite(v):
        raise ConfigError(f"{what}: {x!r} is not finite")
    return v


def _path(p: Any, what: str) -> Path:
    if not isinstance(p, (str, Path)) or not str(p):
        raise ConfigError(f"{what} must be a file or folder path, got {p!r}")
    return Path(p)


def _resolve(p: Any, base_dir: Path | None) -> Path:
    path = _path(p, "path").expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    return path


@dataclass(frozen=True)
class Recipe:
    """Everything one merge run needs.  Operations run in the DESIGN.md §5 order:
    weighted sum of ``bases`` → ``restore_embeddings`` → bake ``lokrs``."""

    out: Path
    bases: tuple[Path, ...]
    weights: tuple[float, ...] | None = None
    restore_embeddings: Path | None = None
    lokrs: tuple[LoKrInput, ...] = ()
    dtype: torch.dtype = torch.float16
    overwrite: bool = False
    #: skip LoKr modules the base lacks (with a warning) instead of stopping
    skip_unmatched: bool = False
    #: sha256 of every input in the output metadata (a second read of each input)
    hash_inputs: bool = False
    title: str | None = None
    #: worker threads for reading and arithmetic (None: 2)
    workers: int | None = None
    extra_metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", _path(self.out, "out"))
        if isinstance(self.bases, (str, Path)):
            object.__setattr__(self, "bases", (self.bases,))
        if not isinstance(self.bases, (list, tuple)):
            raise ConfigError(f"base must be a path or a list of paths, got {self.bases!r}")
        object.__setattr__(self, "bases", tuple(_path(b, "base") for b in self.bases))
        if not self.bases:
            raise ConfigError("a merge needs at least one base checkpoint (--base)")
        if self.weights is not None:
            if not isinstance(self.weights, (list, tuple)):
                raise ConfigError(f"weights must be a list of numbers, got {self.weights!r}")
            ws = tuple(_number(w, "weight") for w in self.weights)
            object.__setattr__(self, "weights", ws)
            if len(ws) != len(self.bases):
                raise ConfigError(
                    f"{len(ws)} weights for {len(self.bases)} bases: give one weight per --base "
                    f"(bases: {', '.join(str(b) for b in self.bases)})"
                )
        if self.restore_embeddings is not None:
            object.__setattr__(self, "restore_embeddings", Path(self.restore_embeddings))
        if isinstance(self.lokrs, (str, Path, LoKrInput)):
            object.__setattr__(self, "lokrs", (self.lokrs,))
        object.__setattr__(self, "lokrs", tuple(LoKrInput.parse(x) for x in self.lokrs))
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0):
            raise ConfigError(f"workers must be a whole number >= 0, got {self.workers!r}")
        for name in ("overwrite", "skip_unmatched", "hash_inputs"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.title is not None and not isinstance(self.title, str):
            raise ConfigError(f"title must be a string, got {self.title!r}")

    @property
    def effective_weights(self) -> tuple[float, ...] | None:
        """The weights of the sum; None when there is nothing to sum (one base, no weight)."""
        if self.weights is not None:
            return self.weights
        if len(self.bases) > 1:
            return tuple(1.0 / len(self.bases) for _ in self.bases)
        return None

    def with_(self, **changes: Any) -> "Recipe":
        return replace(self, **changes)


#: recipe-file key -> Recipe field
_FILE_KEYS = {
    "out": "out",
    "base": "bases",
    "bases": "bases",
    "weights": "weights",
    "restore_embeddings": "restore_embeddings",
    "lokr": "lokrs",
    "lokrs": "lokrs",
    "dtype": "dtype",
    "overwrite": "overwrite",
    "skip_unmatched": "skip_unmatched",
    "hash": "hash_inputs",
    "title": "title",
    "workers": "workers",
    "metadata": "extra_metadata",
}


def recipe_dict_from_toml(path: str | Path) -> dict[str, Any]:
    """Read a recipe file into Recipe field values (paths resolved against its folder)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; --recipe takes a .toml recipe file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    base_dir = path.resolve().parent
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = _FILE_KEYS.get(key.replace("-", "_"))
        if name is None:
            raise ConfigError(f"{path}: unknown recipe key {key!r}; known keys: {', '.join(sorted(set(_FILE_KEYS)))}")
        if name in values:
            raise ConfigError(f"{path}: {key!r} given twice")
        values[name] = value
    for name in ("out", "restore_embeddings"):
        if isinstance(values.get(name), str):
            values[name] = _resolve(values[name], base_dir)
    if "bases" in values:
        bases = values["bases"]
        if not isinstance(bases, (str, list)):
            raise ConfigError(f"{path}: base must be a path or a list of paths, got {bases!r}")
        bases = [bases] if isinstance(bases, str) else list(bases)
        paths, weights = [], []
        for b in bases:
            if isinstance(b, Mapping):
                if "path" not in b or set(b) - {"path", "weight"}:
                    raise ConfigError(f"{path}: base entry {dict(b)!r}: expected keys path and weight")
                paths.append(_resolve(b["path"], base_dir))
                if "weight" in b:
                    weights.append(b["weight"])
            else:
                paths.append(_resolve(b, base_dir))
        if weights:
            if len(weights) != len(paths) or "weights" in values:
                raise ConfigError(f"{path}: give a weight in every base entry, or a weights list, not both")
            values["weights"] = weights
        values["bases"] = paths
    if "lokrs" in values:
        lokrs = values["lokrs"]
        if not isinstance(lokrs, (str, Mapping, list)):
            raise ConfigError(f"{path}: lokr must be a path, a table or a list of them, got {lokrs!r}")
        lokrs = [lokrs] if isinstance(lokrs, (str, Mapping)) else list(lokrs)
        values["lokrs"] = [LoKrInput.parse(x, base_dir) for x in lokrs]
    if "extra_metadata" in values:
        md = values["extra_metadata"]
        if not isinstance(md, Mapping):
            raise ConfigError(f"{path}: metadata must be a table of strings")
        values["extra_metadata"] = {str(k): str(v) for k, v in md.items()}
    for flag in ("overwrite", "skip_unmatched", "hash_inputs"):
        if flag in values and not isinstance(values[flag], bool):
            raise ConfigError(f"{path}: {flag} must be true or false")
    return values


def load_recipe(path: str | Path, **overrides: Any) -> Recipe:
    """A :class:`Recipe` from a TOML file; ``overrides`` (not None) replace file values."""
    values = recipe_dict_from_toml(path)
    values.update({k: v for k, v in overrides.items() if v is not None})
    missing = [k for k in ("out", "bases") if k not in values]
    if missing:
        raise ConfigError(f"{path}: recipe lacks {' and '.join('base' if m == 'bases' else m for m in missing)}")
    try:
        return Recipe(**values)
    except ConfigError as e:
        raise ConfigError(str(e) if str(path) in str(e) else f"{path}: {e}") from None


def recipe_to_toml(recipe: Recipe) -> str:
    """A recipe file that reproduces ``recipe`` (absolute paths)."""
    def q(s: Any) -> str:
        return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"out = {q(recipe.out)}", "base = [" + ", ".join(q(b) for b in recipe.bases) + "]"]
    if recipe.weights is not None:
        lines.append("weights = [" + ", ".join(repr(w) for w in recipe.weights) + "]")
    if recipe.restore_embeddings is not None:
        lines.append(f"restore_embeddings = {q(recipe.restore_embeddings)}")
    if recipe.lokrs:
        lines.append(
            "lokr = [" + ", ".join(f"{{path = {q(l.path)}, multiplier = {l.multiplier!r}}}" for l in recipe.lokrs) + "]"
        )
    lines.append(f"dtype = {q(DTYPE_NAMES[recipe.dtype])}")
    for name, key in (("overwrite", "overwrite"), ("skip_unmatched", "skip_unmatched"), ("hash_inputs", "hash")):
        if getattr(recipe, name):
            lines.append(f"{key} = true")
    if recipe.title:
        lines.append(f"title = {q(recipe.title)}")
    return "\n".join(lines) + "\n"
