"""The sample record: what every data source produces, one per image.

Sources differ (a folder with sidecars, a JSONL manifest, tar shards) but the
rest of the pipeline (buckets, captions, caches, statistics) only ever sees
:class:`SampleRecord`.  A record holds *metadata*, never decoded pixels, so a
list of millions of them stays small and can be pickled into DataLoader
workers.
"""

from __future__ import annotations

import datetime as _dt
import io
import os
from dataclasses import dataclass, field
from typing import BinaryIO, Mapping

from lokr_trainer.errors import BadImageError

#: Rating names accepted in metadata, mapped to danbooru's four ratings.
RATING_ALIASES: Mapping[str, str] = {
    "g": "general",
    "general": "general",
    "safe": "general",
    "s": "sensitive",
    "sensitive": "sensitive",
    "q": "questionable",
    "questionable": "questionable",
    "e": "explicit",
    "explicit": "explicit",
}

RATINGS: tuple[str, ...] = ("general", "sensitive", "questionable", "explicit")


@dataclass
class SampleRecord:
    """One training image and everything known about it before decoding.

    Attributes:
        key: unique, stable identifier (path relative to the dataset root, or a
            shard's ``__key__``); used in logs, caches and statistics.
        path: image file on disk (or the tar shard that holds it, see ``offset``),
            or ``None`` when the bytes travel in ``data``.
        data: encoded image bytes (compressed or remote tar shards), or ``None``.
        offset, size: when set, the image is the ``size`` bytes at ``offset`` in
            ``path`` (a member of a local uncompressed tar shard): records of a
            huge shard set then hold no image bytes, and every rank and worker
            reads just the members it draws.
        shard_stamp: the shard's (size, mtime_ns) when it was indexed; a shard
            rewritten since is refused per image instead of read at stale offsets.
        width, height: displayed size (after EXIF rotation) when known; filled
            by :func:`lokr_trainer.data.images.probe_size` otherwise.
        tags: tag lists by category (``character``, ``copyright``, ``artist``,
            ``general``, ``meta``), raw danbooru spelling (underscores kept).
        head: a ready-made fixed caption head (a ``.txt`` sidecar's part before
            ``|||``); kept verbatim and in order, never shuffled or dropped.
        rating: one of :data:`RATINGS` or ``None``.
        fav_count: favourite count used for quality tags, or ``None``.
        year: upload year used for date tags, or ``None``.
        caption: natural-language caption, or ``None``.
        source: where the record came from (for error messages).
    """

    key: str
    path: str | None = None
    data: bytes | None = field(default=None, repr=False)
    offset: int | None = None
    size: int | None = None
    shard_stamp: tuple[int, int] | None = None
    width: int | None = None
    height: int | None = None
    tags: dict[str, list[str]] = field(default_factory=dict)
    head: list[str] = field(default_factory=list)
    rating: str | None = None
    fav_count: int | None = None
    year: int | None = None
    caption: str | None = None
    source: str = ""

    @property
    def where(self) -> str:
        """The best human-readable location of the image, for logs."""
        if self.path is not None and self.offset is None:
            return self.path
        return f"{self.source or self.path}:{self.key}"

    def _open_shard(self) -> BinaryIO:
        """The shard, checked to be the file that was indexed (same size and mtime)."""
        try:
            fh = open(self.path, "rb")  # type: ignore[arg-type]
        except FileNotFoundError:
            raise BadImageError(self.where, f"shard {self.path} not found", kind="missing") from None
        except OSError as e:
            raise BadImageError(self.where, f"cannot read shard {self.path}: {e.strerror or e}", kind="missing") from None
        if self.shard_stamp is not None:
            st = os.fstat(fh.fileno())
            if (st.st_size, st.st_mtime_ns) != tuple(self.shard_stamp):
                fh.close()
                raise BadImageError(self.where, f"shard {self.path} changed after it was indexed (its offsets may "
                                    "point into other members now); restart the run to index it again", kind="changed")
        return fh

    def open_member(self) -> BinaryIO:
        """A tar member as a seekable file of its own (header probes read a few KiB, not the image)."""
        return io.BufferedReader(_Window(self._open_shard(), int(self.offset or 0), int(self.size or 0), self.where))

    def image_source(self) -> bytes | str | None:
        """What the decoders read: the bytes, a tar member's bytes read from its shard, or the path.

        A shard that is gone, shorter than the member or not the file that was
        indexed raises :class:`~lokr_trainer.errors.BadImageError` (kinds
        ``missing`` / ``truncated`` / ``changed``): a logged skip, never another image.
        """
        if self.data is not None:
            return self.data
        if self.offset is None or self.path is None:
            return self.path
        with self._open_shard() as fh:
            data = os.pread(fh.fileno(), int(self.size or 0), self.offset)
        if len(data) != self.size:
            raise BadImageError(self.where, f"shard {self.path} ends inside this member "
                                f"({len(data)} of {self.size} bytes)", kind="truncated")
        return data

    def has_size(self) -> bool:
        return bool(self.width) and bool(self.height)


class _Window(io.RawIOBase):
    """Bytes [offset, offset + size) of an open file, as a seekable read-only file."""

    def __init__(self, fh: BinaryIO, offset: int, size: int, name: str) -> None:
        self._fh, self._offset, self._size, self._pos = fh, offset, size, 0
        self.name = name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buf: "bytearray | memoryview") -> int:  # type: ignore[override]
        n = max(0, min(len(buf), self._size - self._pos))
        if n == 0:
            return 0
        data = os.pread(self._fh.fileno(), n, self._offset + self._pos)
        buf[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._fh.close()
        super().close()


def normalize_rating(value: object) -> str | None:
    """Map ``g/s/q/e``, ``safe`` and danbooru's names to :data:`RATINGS`; unknown → ``None``."""
    if value is None:
        return None
    return RATING_ALIASES.get(str(value).strip().lower())


def parse_year(value: object) -> int | None:
    """Upload year from an int, a ``YYYY…`` string (ISO dates, danbooru timestamps) or a date.

    Returns ``None`` when the value carries no recognisable year, so a record
    without a usable date simply gets no date tag.
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, (_dt.date, _dt.datetime)):
        return value.year
    if isinstance(value, (int, float)):
        v = int(value)
        if 1900 <= v <= 2200:
            return v
        # Unix timestamp (seconds).
        try:
            return _dt.datetime.fromtimestamp(v, tz=_dt.timezone.utc).year
        except (OverflowError, OSError, ValueError):
            return None
    text = str(value).strip()
    if len(text) >= 4 and text[:4].isdigit():
        y = int(text[:4])
        return y if 1900 <= y <= 2200 else None
    return None
