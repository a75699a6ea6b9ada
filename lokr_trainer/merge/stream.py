"""Tensor sources and the ordered, bounded pipeline of the streaming merge.

Why not ``safe_open``: it maps the whole file, so peak RSS as ``time -v``
reports it is the file size (6.9 GB for SDXL) however little the merge holds.
Here every tensor is read from its own byte range with ``pread`` into a fresh
buffer, which is freed as soon as the tensor is written; with a few tensors in
flight the process stays well under 1 GB.

A *source* presents any SDXL checkpoint as single-file keys in a fixed read
order: a ``.safetensors`` file as it is, or a diffusers folder converted key by
key through :mod:`lokr_trainer.sdxl.keys` (q/k/v stacking, ``text_projection``
transpose, VAE attention 1x1 convs, ``position_ids``/``logit_scale`` defaults),
without building any network.
"""

from __future__ import annotations

import errno
import hashlib
import math
import mmap
import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Protocol, Sequence, TypeVar

import torch

from lokr_trainer.errors import CheckpointError, CorruptFileError, KeyMapError
from lokr_trainer.safetensors_io import (
    PlannedTensor,
    SafetensorsHeader,
    TensorInfo,
    checked_bytes,
    atomic_output,
    element_size,
    header_bytes,
    read_header,
)
from lokr_trainer.sdxl.keys import (
    PREFIXES,
    Layouts,
    UNetLayout,
    VAELayout,
    is_vae_attention_weight,
    model_name_to_file_key,
)
from lokr_trainer.sdxl.layout import (
    DIFFUSERS_FOLDERS,
    DIFFUSERS_WEIGHT_STEMS,
    diffusers_weight_files,
    passthrough_defaults,
    read_component_config,
)

__all__ = [
    "DiffusersFolderSource",
    "SafetensorsSource",
    "TensorMeta",
    "TensorSource",
    "file_sha256",
    "open_source",
    "ordered_map",
    "tune_malloc",
    "write_stream",
]


@dataclass(frozen=True)
class TensorMeta:
    """Name, dtype and shape of one tensor as a source will deliver it."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * element_size(self.dtype)


class TensorSource(Protocol):
    """A checkpoint seen as single-file keys (what the merge consumes)."""

    path: Path
    #: bytes on disk (all files of a folder), recorded in the output metadata
    size_bytes: int
    metadata: dict[str, str]

    def keys(self) -> list[str]: ...  # in the order reads are cheapest

    def meta(self, key: str) -> TensorMeta: ...

    def read(self, key: str) -> torch.Tensor: ...

    def files(self) -> list[Path]: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- raw reads


class _RangeReader:
    """Thread-safe reads of byte ranges of one file (``pread``; no shared file position)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._lock = None if hasattr(os, "preadv") else threading.Lock()
        if hasattr(os, "posix_fadvise"):  # we read front to back: let the kernel read ahead further
            try:
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except OSError:  # pragma: no cover - advisory only
                pass

    def read(self, info: TensorInfo) -> torch.Tensor:
        """A fresh CPU tensor with the bytes of ``info`` (no zero-fill, no mapping)."""
        n = info.nbytes
        buf = torch.empty(n, dtype=torch.uint8)
        if n:
            view = memoryview(buf.numpy())
            done = 0
            while done < n:
                if self._lock is None:
                    got = os.preadv(self._fd, [view[done:]], info.start + done)
                else:  # pragma: no cover - platforms without preadv (Windows)
                    with self._lock:
                        os.lseek(self._fd, info.start + done, os.SEEK_SET)
                        got = os.readv(self._fd, [view[done:]])
                if got <= 0:
                    raise CorruptFileError(
                        self.path, f"tensor {info.name!r}: short read ({done}/{n} bytes)", "the file changed or is truncated"
                    )
                done += got
        return buf.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SafetensorsSource:
    """A single ``.safetensors`` file, keys in on-disk order (sequential reads)."""

    def __init__(self, path: str | Path) -> None:
        self.header: SafetensorsHeader = read_header(path)
        self.path = self.header.path
        self.size_bytes = self.header.file_size
        self.metadata = dict(self.header.metadata)
        self._order = [t.name for t in sorted(self.header.tensors.values(), key=lambda t: t.start)]
        self._reader = _RangeReader(self.path)

    def keys(self) -> list[str]:
        return list(self._order)

    def meta(self, key: str) -> TensorMeta:
        t = self.header.tensors[key]
        return TensorMeta(key, t.dtype, t.shape)

    def read(self, key: str) -> torch.Tensor:
        return self._reader.read(self.header.tensors[key])

    def files(self) -> list[Path]:
        return [self.path]

    def close(self) -> None:
        self._reader.close()


# --------------------------------------------------------------------------- diffusers folders

_FOLDERS, _STEMS = DIFFUSERS_FOLDERS, DIFFUSERS_WEIGHT_STEMS


def _folder_layouts(folder: Path) -> tuple[Layouts, int]:
    ucfg = read_component_config(folder / "unet")
    vcfg = read_component_config(folder / "vae")
    tcfg = read_component_config(folder / "text_encoder")
    try:
        unet = UNetLayout.from_diffusers_config(ucfg)
        vae = VAELayout(len(vcfg.get("block_out_channels", [0, 0, 0, 0])))
        return Layouts(unet=unet, vae=vae), int(tcfg.get("max_position_embeddings", 77))
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise CorruptFileError(folder, f"a component config.json is unusable ({type(e).__name__}: {e})",
                               "the diffusers folder is damaged; re-export it") from None


@dataclass(frozen=True)
class _Part:
    """Where one single-file key comes from in a diffusers folder."""

    meta: TensorMeta
    #: (file index, tensor name) of the pieces; three for a stacked q/k/v tensor
    pieces: tuple[tuple[int, str], ...] = ()
    transform: str = ""  # "" | "transpose" | "conv1x1" | "cat" | "default"
    default: torch.Tensor | None = None


class DiffusersFolderSource:
    """A diffusers SDXL folder presented as single-file keys, converted tensor by tensor.

    Produces exactly the keys, shapes, dtypes and values that
    ``save_sdxl(load_sdxl(folder, dtype=None))`` would write, but reads one
    tensor at a time and never imports diffusers or transformers.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder)
        layouts, n_positions = _folder_layouts(self.path)
        self.metadata: dict[str, str] = {}
        self._headers: list[SafetensorsHeader] = []
        self._readers: list[_RangeReader] = []
        self._parts: dict[str, _Part] = {}
        qkv: dict[str, list[tuple[int, str, TensorInfo] | None]] = {}
        try:
            for comp, subname in _FOLDERS.items():
                for file in diffusers_weight_files(self.path / subname, _STEMS[comp]):
                    fi = len(self._headers)
                    header = read_header(file)
                    self._headers.append(header)
                    self._readers.append(_RangeReader(file))
                    for t in sorted(header.tensors.values(), key=lambda t: t.start):
                        self._add(comp, fi, t, layouts, qkv)
            for key, slots in qkv.items():
                if any(s is None for s in slots):
                    raise CorruptFileError(self.path, f"incomplete q/k/v set for {key!r}")
                shapes = {s[2].shape[1:] for s in slots}  # type: ignore[index]
                dtypes = {s[2].dtype for s in slots}  # type: ignore[index]
                if len(shapes) != 1 or len(dtypes) != 1:
                    raise CorruptFileError(self.path, f"q/k/v of {key!r} differ in shape or dtype")
                rows = sum(s[2].shape[0] for s in slots)  # type: ignore[index]
                first = slots[0][2]  # type: ignore[index]
                self._parts[key] = _Part(
                    TensorMeta(key, first.dtype, (rows, *first.shape[1:])),
                    tuple((s[0], s[1]) for s in slots),  # type: ignore[index]
                    "cat",
                )
        except BaseException:
            self.close()
            raise
        # Tensors a single file has but diffusers does not store (the same defaults load.py writes).
        for key, value in passthrough_defaults(n_positions).items():
            if key not in self._parts:
                self._parts[key] = _Part(TensorMeta(key, value.dtype, tuple(value.shape)), (), "default", value)
        self.size_bytes = sum(h.file_size for h in self._headers)

    def _add(self, comp: str, fi: int, t: TensorInfo, layouts: Layouts, qkv) -> None:
        name = t.name
        if comp == "text_encoder" and not name.startswith("text_model."):
            name = "text_model." + name  # transformers 5 may save CLIPTextModel without the level
        if comp == "text_encoder" and name.endswith("embeddings.position_ids"):
            key = PREFIXES[comp] + name
            self._parts[key] = _Part(TensorMeta(key, t.dtype, t.shape), ((fi, t.name),))
            return
        try:
            key, idx = model_name_to_file_key(comp, name, layouts)
        except KeyMapError as e:
            raise CorruptFileError(self._headers[fi].path, f"tensor {t.name!r} is not part of an SDXL {comp}: {e}") from None
        if idx is not None:
            slots = qkv.setdefault(key, [None, None, None])
            slots[idx] = (fi, t.name, t)
            return
        if key in self._parts:
            raise CorruptFileError(self._headers[fi].path, f"tensor {t.name!r} maps to {key!r} twice")
        if comp == "text_encoder_2" and key.endswith(".text_projection"):
            self._parts[key] = _Part(TensorMeta(key, t.dtype, tuple(reversed(t.shape))), ((fi, t.name),), "transpose")
        elif comp == "vae" and is_vae_attention_weight(name) and len(t.shape) == 2:
            self._parts[key] = _Part(TensorMeta(key, t.dtype, (*t.shape, 1, 1)), ((fi, t.name),), "conv1x1")
        else:
            self._parts[key] = _Part(TensorMeta(key, t.dtype, t.shape), ((fi, t.name),))

    def keys(self) -> list[str]:
        return list(self._parts)

    def meta(self, key: str) -> TensorMeta:
        return self._parts[key].meta

    def _piece(self, fi: int, name: str) -> torch.Tensor:
        return self._readers[fi].read(self._headers[fi].tensors[name])

    def read(self, key: str) -> torch.Tensor:
        part = self._parts[key]
        if part.transform == "default":
            return part.default.clone()  # type: ignore[union-attr]
        if part.transform == "cat":
            return torch.cat([self._piece(fi, n) for fi, n in part.pieces], dim=0)
        t = self._piece(*part.pieces[0])
        if part.transform == "transpose":
            return t.t().contiguous()
        if part.transform == "conv1x1":
            return t[:, :, None, None]
        return t

    def files(self) -> list[Path]:
        return [h.path for h in self._headers]

    def close(self) -> None:
        for r in self._readers:
            r.close()


def open_source(path: str | Path) -> SafetensorsSource | DiffusersFolderSource:
    """A single ``.safetensors`` file or a diffusers folder, as single-file keys."""
    path = Path(path)
    if path.is_dir():
        return DiffusersFolderSource(path)
    if not path.exists():
        raise CheckpointError(path, "file not found")
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise CheckpointError(
            path, "is a pickle checkpoint; the merge reads safetensors only",
            "convert it first (e.g. load_sdxl(..., allow_pickle=True) then save_sdxl)",
        )
    return SafetensorsSource(path)


# --------------------------------------------------------------------------- writing

#: Bytes staged per write; a multiple of every block size O_DIRECT may need.
STAGING_BYTES = 32 << 20
_ALIGN = 4096


def _enable_direct(fd: int) -> bool:
    """Switch ``fd`` to O_DIRECT where the OS and file system allow it."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        import fcntl

        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
    except OSError:
        return False


def _disable_direct(fd: int) -> None:
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)


def _write_all(fd: int, view: memoryview) -> None:
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])


class _StagedFile:
    """Sequential writes through aligned staging buffers, with O_DIRECT when it works.

    Why: on this class of machine writing through the page cache costs more
    CPU (copies, reclaim) than the whole merge's arithmetic; ``dd oflag=direct``
    copies SDXL in 4 s where ``cp`` takes 10 s.  Direct writes block until the
    device has the data, so a writer thread writes one full buffer while the
    caller fills the next.  The last buffer is padded to the block size and
    the file truncated to its real length.  Falls back to ordinary writes when
    the file system refuses O_DIRECT (tmpfs, some network and FUSE mounts).
    """

    def __init__(self, fd: int, direct: bool = True, buffers: int = 2) -> None:
        self.fd = fd
        self.direct = direct and _enable_direct(fd)
        self._maps = [mmap.mmap(-1, STAGING_BYTES) for _ in range(buffers)]  # page-aligned, as O_DIRECT needs
        self._bufs = [torch.frombuffer(m, dtype=torch.uint8) for m in self._maps]
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(1, buffers):
            self._free.put(i)
        self._todo: queue.Queue[tuple[int, int] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._writer, name="lokr-merge-writer", daemon=True)
        self._thread.start()
        self.current = 0  # buffer being filled
        self.used = 0  # bytes staged in it
        self.flushed = 0  # bytes written to the file (writer thread)
        self.size = 0  # bytes appended in all

    def write(self, data: torch.Tensor) -> None:
        """Append the bytes of a uint8 tensor (copied by torch, outside the GIL)."""
        n, pos = data.numel(), 0
        while pos < n:
            k = min(n - pos, STAGING_BYTES - self.used)
            self._bufs[self.current][self.used : self.used + k].copy_(data[pos : pos + k])
            self.used += k
            pos += k
            if self.used == STAGING_BYTES:
                self._submit(STAGING_BYTES)
                self.current = self._take_free()
        self.size += n

    def _submit(self, nbytes: int) -> None:
        self._raise_if_failed()
        self._todo.put((self.current, nbytes))
        self.used = 0

    def _take_free(self) -> int:
        while True:
            try:
                return self._free.get(timeout=0.5)
            except queue.Empty:
                self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _writer(self) -> None:
        while (job := self._todo.get()) is not None:
            if self._error is None:
                try:
                    self._write_buffer(*job)
                except BaseException as e:  # handed to the caller's thread
                    self._error = e
            self._free.put(job[0])

    def _write_buffer(self, index: int, nbytes: int) -> None:
        view = memoryview(self._maps[index])[:nbytes]
        try:
            _write_all(self.fd, view)
        except OSError as e:
            if not (self.direct and e.errno == errno.EINVAL):
                raise
            # accepted at fcntl() time, refused at write() time: write through the page cache
            _disable_direct(self.fd)
            self.direct = False
            os.lseek(self.fd, self.flushed, os.SEEK_SET)
            _write_all(self.fd, view)
        finally:
            view.release()
        self.flushed += nbytes

    def finish(self) -> None:
        """Write what is staged, wait for the writer, set the exact file size."""
        if self.used:
            n = self.used
            padded = -(-n // _ALIGN) * _ALIGN
            self._bufs[self.current][n:padded].zero_()
            self._submit(padded)
        self._stop()
        self._raise_if_failed()
        os.ftruncate(self.fd, self.size)

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._todo.put(None)
            self._thread.join()

    def close(self) -> None:
        self._stop()
        self._bufs.clear()
        for m in self._maps:
            m.close()


def write_stream(
    path: str | Path,
    plan: Sequence[PlannedTensor],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    direct: bool = True,
) -> Path:
    """``safetensors_io.write_safetensors`` with direct I/O: same contract, same bytes.

    Tensors come in ``plan`` order and are checked against it; the file is
    made by :func:`~lokr_trainer.safetensors_io.atomic_output` (temp file,
    fsync, umask permissions, rename; removed on any error, Ctrl-C, SIGTERM).
    """
    path = Path(path)
    header = torch.frombuffer(bytearray(header_bytes(plan, metadata)), dtype=torch.uint8)
    with atomic_output(path, overwrite=overwrite) as fd:
        staged = _StagedFile(fd, direct)
        try:
            staged.write(header)
            for data in checked_bytes(path, plan, tensors):
                if data.numel():
                    staged.write(data)
                if progress is not None:
                    progress(data.numel())
                del data
            staged.finish()
        finally:
            staged.close()
    return path


# --------------------------------------------------------------------------- allocator


def tune_malloc() -> bool:
    """Keep freed tensor memory in the process for the next tensor (glibc only).

    Why: glibc serves every allocation above a (dynamic, at most 32 MB)
    threshold with a fresh ``mmap`` and unmaps it on free, so each large
    tensor costs one page fault per 4 KiB (~0.3 ns/byte here); for a 7 GB
    bake that was half of all CPU time.  With one arena, no mmap below 1 GiB
    and no trimming, the same heap pages are reused tensor after tensor; peak
    RSS went down, not up (the pipeline bounds what is live).  The setting
    is process-wide and permanent, so the CLI calls this and library callers
    decide for themselves.  Returns False where it does nothing.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:  # pragma: no cover
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1
    ok &= libc.mallopt(m_trim_threshold, 1 << 30) == 1
    ok &= libc.mallopt(m_arena_max, 1) == 1
    return bool(ok)


# --------------------------------------------------------------------------- hashing


def file_sha256(paths: Sequence[Path], progress: Callable[[int], None] | None = None, chunk: int = 8 << 20) -> str:
    """sha256 over the bytes of ``paths`` in order (one file: its usual checksum)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
                if progress is not None:
                    progress(n)
    return h.hexdigest()


# --------------------------------------------------------------------------- ordered pipeline

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    cost: Callable[[T], int],
    workers: int = 2,
    max_inflight_bytes: int = 256 << 20,
    max_inflight_items: int = 64,
) -> Iterator[R]:
    """``map(fn, items)`` on worker threads, results in input order, memory bounded.

    Why: reading, fp32 arithmetic and writing each leave the CPU idle part of
    the time; with a few tensors in flight the writer (the caller, consuming
    this iterator) overlaps with reads and maths.  ``cost`` is the bytes an item
    holds until the caller has taken its result; a new item starts only while
    the total stays under ``max_inflight_bytes`` (one item always may), so RAM is
    bounded whatever the tensor sizes.  Closing the iterator (or an error in
    ``fn``, re-raised here in order) cancels what has not started and waits for
    what has.
    """
    if workers <= 0:
        for item in items:
            yield fn(item)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lokr-merge")
    pending: deque[tuple[Future, int]] = deque()
    inflight = 0
    it = iter(items)
    nxt: list = []
    try:
        while True:
            while len(pending) < max_inflight_items:
                if not nxt:
                    try:
                        nxt.append(next(it))
                    except StopIteration:
                        break
                c = cost(nxt[0])
                if pending and inflight + c > max_inflight_bytes:
                    break
                pending.append((pool.submit(fn, nxt.pop()), c))
                inflight += c
            if not pending:
                return
            fut, c = pending.popleft()
            result = fut.result()
            inflight -= c
            del fut
            yield result
    finally:
        for fut, _ in pending:
            fut.cancel()
        pending.clear()
        pool.shutdown(wait=True)
