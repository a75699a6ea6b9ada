"""Validated, streaming access to ``.safetensors`` files.

Why not only ``safetensors.safe_open``/``save_file``: ``save_file`` needs every
output tensor in RAM at once (a cast fp32 -> fp16 SDXL is 1.5x the model),
``safe_open`` maps the whole file (peak RSS = file size) and neither says *what*
is wrong with a truncated file.  Here the header is checked against the file
size before anything is read, each tensor is read from its own byte range, and
writing goes tensor by tensor into a temporary file that is renamed into
place only when complete, so a crash or a full disk never leaves a
half-written output.  The format is the public safetensors layout: an 8-byte
little-endian header length, a JSON header, then the raw little-endian data.
"""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import struct
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Mapping, Sequence

import torch

from lokr_trainer.errors import CheckpointError, ConfigError, CorruptFileError, OutputWriteError

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("lokr_trainer.safetensors_io needs a little-endian machine")

#: safetensors dtype codes <-> torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    DTYPES["F8_E4M3"] = torch.float8_e4m3fn
    DTYPES["F8_E5M2"] = torch.float8_e5m2
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

#: Float dtype names every writer accepts (``save_sdxl``, ``save_lokr``, the merge).
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
DTYPE_NAMES: dict[torch.dtype, str] = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A float dtype from ``"fp16"``/``"bf16"``/``"fp32"`` (and their long names) or a torch dtype."""
    if isinstance(name, torch.dtype):
        if name in DTYPE_NAMES:
            return name
        raise ConfigError(f"output dtype {name} is not supported: use fp16, bf16 or fp32")
    try:
        return FLOAT_DTYPES[str(name).lower()]
    except KeyError:
        raise ConfigError(f"unknown output dtype {name!r}: use fp16, bf16 or fp32") from None

_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in the file (absolute byte offsets)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_size: int

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_INT64_MAX = 2**63 - 1
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def check_regular_file(path: Path) -> int:
    """The size of ``path`` if it is a readable regular file; otherwise an error saying what it is."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise CheckpointError(path, f"is a broken symbolic link (to {os.readlink(path)})") from None
        raise CheckpointError(path, "file not found") from None
    except OSError as e:
        if e.errno == 40:  # ELOOP
            raise CheckpointError(path, "is a symbolic link loop") from None
        raise CheckpointError(path, f"cannot be read ({e.strerror})") from None
    kinds = (
        (stat.S_ISDIR, "is a folder, not a .safetensors file"),
        (stat.S_ISFIFO, "is a FIFO (named pipe), not a .safetensors file"),
        (stat.S_ISCHR, "is a character device, not a .safetensors file"),
        (stat.S_ISBLK, "is a block device, not a .safetensors file"),
        (stat.S_ISSOCK, "is a socket, not a .safetensors file"),
    )
    for test, what in kinds:
        if test(st.st_mode):
            raise CheckpointError(path, what)
    if not os.access(path, os.R_OK):
        raise CheckpointError(path, "cannot be read (permission denied)")
    return st.st_size


def _strict_json(raw: bytes, path: Path, hint: str) -> dict:
    """The header object; duplicate keys, NaN/Infinity and absurd nesting are refused (as safetensors does)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        for k, v in pairs:
            if k in out:
                raise CorruptFileError(path, f"header has the key {k!r} twice", hint)
            out[k] = v
        return out

    def no_constant(name: str) -> Any:
        raise CorruptFileError(path, f"header holds {name}, which JSON does not allow", hint)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(path, f"header is not valid JSON ({e})", hint) from None
    except RecursionError:
        raise CorruptFileError(path, "header JSON is nested too deeply", hint) from None
    if not isinstance(header, dict):
        raise CorruptFileError(path, "header is not a JSON object", hint)
    return header


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _INT64_MAX


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate the whole header against the file; read no tensor data.

    At least as strict as the ``safetensors`` package: every entry has exactly
    a known dtype, a shape of non-negative int64 integers and two integer
    offsets whose span is the shape's byte size; sorted by offset the entries
    tile the data area exactly (no gap, no overlap, so entries can never alias
    one range and multiply memory) and the last one ends at the end of the
    file (no trailing bytes).  Nothing is allocated from an unchecked value.
    """
    path = Path(path)
    size = check_regular_file(path)
    hint = "the file is truncated, damaged or not a .safetensors file; download or copy it again"
    if size < 8:
        raise CorruptFileError(path, f"only {size} bytes, too short for a safetensors header", hint)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            raise CorruptFileError(path, f"header length {n} does not fit a {size}-byte file", hint)
        if n > _MAX_HEADER:  # the file is big enough: the cap, not the size, is the reason
            raise CorruptFileError(path, f"header of {n} bytes is over the {_MAX_HEADER}-byte limit for headers", hint)
        raw = f.read(n)
    header = _strict_json(raw, path, hint)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptFileError(path, "__metadata__ must map strings to strings", hint)
    base = 8 + n
    entries: list[tuple[int, int, str, torch.dtype, tuple[int, ...]]] = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != _ENTRY_KEYS:
            raise CorruptFileError(path, f"tensor {name!r} has an invalid header entry {str(info)[:200]}", hint)
        dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise CorruptFileError(path, f"tensor {name!r} has an unknown dtype {info['dtype']!r}", hint)
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_whole(d) for d in shape):
            raise CorruptFileError(path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers", hint)
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_whole(x) for x in offsets):
            raise CorruptFileError(path, f"tensor {name!r}: data_offsets {offsets!r} are not two non-negative integers", hint)
        count = math.prod(shape)
        if count > _INT64_MAX:
            raise CorruptFileError(path, f"tensor {name!r}: shape {shape} has more elements than int64 can count", hint)
        begin, end = offsets
        expected = count * element_size(dtype)
        if end < begin or end - begin != expected:
            raise CorruptFileError(
                path, f"tensor {name!r}: {end - begin} bytes stored for {info['dtype']}{list(shape)} ({expected})", hint
            )
        if base + end > size:
            raise CorruptFileError(path, f"tensor {name!r} ends at byte {base + end} but the file has {size} bytes", hint)
        entries.append((begin, end, name, dtype, tuple(shape)))
    position = 0
    for begin, end, name, _, _ in sorted(entries, key=lambda e: (e[0], e[1])):
        if begin < position:
            raise CorruptFileError(path, f"tensor {name!r} overlaps the data of another tensor (byte {base + begin})", hint)
        if begin > position:
            raise CorruptFileError(path, f"{begin - position} unused bytes before tensor {name!r} (byte {base + position})", hint)
        position = end
    if base + position != size:
        raise CorruptFileError(path, f"{size - base - position} bytes after the last tensor's data", hint)
    tensors = {name: TensorInfo(name, dtype, shape, base + begin, base + end) for begin, end, name, dtype, shape in entries}
    return SafetensorsHeader(path=path, tensors=tensors, metadata=dict(meta), file_size=size)


def read_tensor(f: BinaryIO, info: TensorInfo) -> torch.Tensor:
    """Read one tensor from its byte range into a fresh, writable CPU tensor."""
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    buf = bytearray(info.nbytes)
    f.seek(info.start)
    got = f.readinto(buf)
    if got != info.nbytes:
        raise CorruptFileError(getattr(f, "name", None), f"tensor {info.name!r}: short read ({got}/{info.nbytes} bytes)")
    return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)


class SafetensorsReader:
    """Random access to the tensors of one file, one byte range at a time."""

    def __init__(self, path: str | Path) -> None:
        self.header = read_header(path)
        self.path = self.header.path
        self._f: BinaryIO | None = None

    def __enter__(self) -> "SafetensorsReader":
        self._f = open(self.path, "rb")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.header.tensors

    def get(self, key: str) -> torch.Tensor:
        if self._f is None:
            self._f = open(self.path, "rb")
        return read_tensor(self._f, self.header.tensors[key])


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def header_bytes(plan: Iterable[PlannedTensor], metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length and JSON header of a file holding ``plan`` in order (the one place its layout is written)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for t in plan:
        n = math.prod(t.shape) * element_size(t.dtype)
        header[t.name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def checked_bytes(
    path: Path, plan: Sequence[PlannedTensor], tensors: Iterable[tuple[str, torch.Tensor]]
) -> Iterator[torch.Tensor]:
    """Each tensor's raw bytes (flat uint8, CPU, contiguous), in plan order, checked against the plan.

    A tensor whose name, dtype or shape differs from the plan, or a producer
    that stops early, is an error naming the output file, not a corrupt file.
    """
    it: Iterator[tuple[str, torch.Tensor]] = iter(tensors)
    for expected in plan:
        try:
            name, t = next(it)
        except StopIteration:
            raise CheckpointError(path, f"writer ran out of tensors before {expected.name!r}") from None
        if name != expected.name or t.dtype != expected.dtype or tuple(t.shape) != expected.shape:
            raise CheckpointError(
                path,
                f"tensor {name!r} {t.dtype}{list(t.shape)} does not match the planned "
                f"{expected.name!r} {expected.dtype}{list(expected.shape)}",
            )
        yield t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside ``folder`` durable (best effort: not every OS can open a folder)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(dfd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dfd)


_TERMINATING = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


class _Terminated(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _cleanup_on_termination() -> Iterator[None]:
    """SIGTERM/SIGHUP, when nobody handles them, unwind like Ctrl-C (so temp files go), then kill as before."""
    installed: dict[int, Any] = {}

    def raise_terminated(signum: int, frame: Any) -> None:
        raise _Terminated(signum)

    try:
        for sig in _TERMINATING:
            if signal.getsignal(sig) is signal.SIG_DFL:  # a program with its own handler keeps it
                installed[sig] = signal.signal(sig, raise_terminated)
    except ValueError:  # not the main thread: signals cannot be handled here
        installed.clear()
    try:
        yield
    except _Terminated as t:
        for sig, prev in installed.items():
            signal.signal(sig, prev)
        installed.clear()
        os.kill(os.getpid(), t.signum)  # the default action, now that the temp file is gone
        raise
    finally:
        for sig, prev in installed.items():
            signal.signal(sig, prev)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs (for telling a live writer's temp files from a dead one's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's live process
        return True
    return True


def remove_stale_temps(path: Path) -> None:
    """Delete temp files an earlier, killed write of ``path`` left (``.{name}.{pid}.*.tmp`` of dead pids)."""
    prefix = f".{path.name}."
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]
    except OSError:
        return
    for p in candidates:
        pid = p.name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            p.unlink(missing_ok=True)


def _new_file_mode(path: Path) -> int:
    """The replaced file's mode, else what the umask gives a new file (mkstemp's 0600 is not what users want)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextmanager
def atomic_output(path: str | Path, *, overwrite: bool, clean_stale: bool = True) -> Iterator[int]:
    """A temporary file beside ``path`` (an open fd) that becomes ``path`` when the block ends cleanly.

    The one way outputs are written: the data is fsynced, the file gets the
    permissions a normal write would give (the umask, or the replaced file's
    mode), it is renamed into place and the rename made durable.  On any
    exception, Ctrl-C, SIGTERM or SIGHUP the temp file is removed; temp files
    of earlier killed writes are removed first; ``OSError`` becomes
    :class:`~lokr_trainer.errors.OutputWriteError` naming ``path``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(path, "output exists", "pass overwrite=True (--overwrite) to replace it")
    if path.is_dir():
        raise CheckpointError(path, "is a folder; the output must be a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if clean_stale:
            remove_stale_temps(path)
        mode = _new_file_mode(path)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputWriteError(path, e) from e
    tmp = Path(tmp_name)
    open_fd = fd
    with _cleanup_on_termination():
        try:
            yield fd
            os.fsync(fd)
            os.close(fd)
            open_fd = -1
            os.chmod(tmp, mode)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except BaseException as e:
            if open_fd >= 0:
                os.close(open_fd)
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError) and not isinstance(e, OutputWriteError):
                raise OutputWriteError(path, e) from e
            raise


def write_safetensors(
    path: str | Path,
    plan: list[PlannedTensor],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = True,
    progress=None,
    clean_stale: bool = True,
) -> Path:
    """Write tensors one at a time, in ``plan`` order, atomically (:func:`atomic_output`).

    ``tensors`` yields ``(name, tensor)`` in plan order; each is checked against
    the plan (so a wrong shape is an error, not a corrupt file) and may be
    freed by the producer right after.
    """
    path = Path(path)
    with atomic_output(path, overwrite=overwrite, clean_stale=clean_stale) as fd:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(header_bytes(plan, metadata))
            for data in checked_bytes(path, plan, tensors):
                if data.numel():
                    f.write(memoryview(data.numpy()))
                if progress is not None:
                    progress(data.numel())
    return path


def save_tensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = True,
    clean_stale: bool = True,
) -> Path:
    """A dict of tensors as one safetensors file, in key order, through :func:`write_safetensors`."""
    items = [(k, tensors[k].detach().to("cpu").contiguous()) for k in tensors]
    plan = [PlannedTensor(k, t.dtype, tuple(t.shape)) for k, t in items]
    return write_safetensors(path, plan, iter(items), metadata, overwrite=overwrite, clean_stale=clean_stale)
