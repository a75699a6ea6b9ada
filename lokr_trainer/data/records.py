"""The sample record: what every data source produces, one per image.

Sources differ (a folder with sidecars, a JSONL manifest, tar shards) but the
rest of the pipeline (buckets, captions, caches, statistics) only ever sees
:class:`SampleRecord`.  A record holds *metadata*, never decoded pixels, so a
list of millions of them stays small and can be pickled into DataLoader
workers.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Mapping

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
        path: image file on disk, or ``None`` when the bytes travel in ``data``.
        data: encoded image bytes (tar shards), or ``None`` for files on disk.
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
        return self.path if self.path is not None else f"{self.source}:{self.key}"

    def has_size(self) -> bool:
        return bool(self.width) and bool(self.height)


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
