"""One exception hierarchy for the whole library.

Every error a user can cause (bad file, bad config, bad data) is a
:class:`LokrTrainerError`, so scripts can catch one type and print one clean
message.  Messages say what was wrong *and* how to fix it.
"""

from __future__ import annotations

from pathlib import Path


class LokrTrainerError(Exception):
    """Base class of every error raised on purpose by lokr_trainer."""


class ConfigError(LokrTrainerError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class CheckpointError(LokrTrainerError):
    """A model file or folder cannot be used; the message names the file."""

    def __init__(self, path: str | Path | None, problem: str, hint: str = "") -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        self.hint = hint
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{problem}" + (f" ({hint})" if hint else ""))


class CorruptFileError(CheckpointError):
    """The file is truncated, not safetensors, or its header is inconsistent."""


class WrongModelError(CheckpointError):
    """The file is a valid checkpoint, but not of the expected model (e.g. SD1.5 given as SDXL)."""


class MissingComponentError(CheckpointError):
    """A required part (UNet, a text encoder, the VAE, a tokenizer) is absent."""


class UnsafeFormatError(CheckpointError):
    """A pickle-based file was given without the explicit opt-in to read it."""


class KeyMapError(LokrTrainerError, KeyError):
    """A tensor name has no counterpart in the other layout."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(LokrTrainerError, ValueError):
    """Tensors that must agree in shape do not."""


class DataError(LokrTrainerError):
    """A dataset, manifest, sidecar or cache cannot be used as given."""


class BadImageError(DataError):
    """One image cannot be decoded or is refused (empty, corrupt, not an image, too large).

    Training loops catch this per sample, log the path and count it; it never
    stops a run on its own.
    """

    def __init__(self, path: str | Path | None, reason: str, kind: str = "unreadable") -> None:
        self.path = None if path is None else str(path)
        self.reason = reason
        #: short category for summaries: empty, missing, not_an_image, truncated, too_large, unreadable,
        #: wrong_size (the file disagrees with its stated size), changed (a shard rewritten after indexing)
        self.kind = kind
        super().__init__(f"{self.path or '<bytes>'}: {reason}")

    def __reduce__(self):  # keep path/reason/kind across DataLoader worker pickling
        return (type(self), (self.path, self.reason, self.kind))


class ManifestError(DataError):
    """A manifest line or sidecar file is malformed; the message names file and line."""


class CacheError(DataError):
    """A cache cannot be built or used (wrong settings, unwritable directory)."""


class MergeError(LokrTrainerError):
    """A merge cannot be carried out as asked; the message names the file and the key."""


class UnmatchedModuleError(MergeError):
    """Adapter modules name layers the base checkpoint lacks (an opt-in skips them)."""


class NonFiniteResultError(MergeError, ArithmeticError):
    """A merged tensor holds inf or nan; the output is not written."""


class TrainingError(LokrTrainerError):
    """A run cannot go on (e.g. too many non-finite steps in a row); the last good state is kept."""


class OutputWriteError(CheckpointError, OSError):
    """Writing an output failed (no space, read-only folder, parent is a file, ...); nothing was left behind.

    Also an ``OSError`` with the original ``errno``, so callers that handle OS
    errors keep working.
    """

    def __init__(self, path: str | Path, err: OSError) -> None:
        reason = err.strerror or str(err)
        CheckpointError.__init__(self, path, f"cannot write the output: {reason}", _WRITE_HINTS.get(err.errno, ""))
        self.errno, self.strerror, self.filename = err.errno, err.strerror, str(path)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


_WRITE_HINTS = {
    28: "free disk space or write to another folder; nothing was left behind",  # ENOSPC
    30: "the folder is read-only; choose another output folder",  # EROFS
    13: "no permission to write there; choose another output folder",  # EACCES
    20: "a part of the output path is a file, not a folder",  # ENOTDIR
    122: "disk quota exceeded; free space or write elsewhere",  # EDQUOT
}
