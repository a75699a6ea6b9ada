"""Data sources: a folder with sidecars, a JSONL manifest, webdataset tar shards.

All three yield :class:`~lokr_trainer.data.records.SampleRecord`.  Metadata
schema (a ``.json`` sidecar, a manifest line, a shard's ``.json`` member)::

    {
      "path": "imgs/0001.webp",            # manifest only; relative to the manifest's folder
      "tags": {"general": [...], "character": [...], "copyright": [...],
               "artist": [...], "meta": [...]},
      "rating": "g" | "s" | "q" | "e" | "general" | ... ,
      "fav_count": 123,
      "created_at": "2021-05-01T12:00:00Z", # or "date" / "year"
      "caption": "natural-language caption",
      "width": 1024, "height": 1536        # optional; read from the image otherwise
    }

``tags`` may also be a flat list or a comma-separated string (all general
tags), and per-category values may be comma-separated strings (``series`` is
accepted for ``copyright``, ``artists``/``characters`` for the singular).
Danbooru API fields (``tag_string_general`` etc., space-separated;
``image_width``/``image_height``) are read too, so ``gallery-dl`` metadata works
as is.  A ``.txt`` sidecar holds comma-separated tags; text before ``|||`` is
a fixed caption head, and ``keep_tokens`` makes the first N tags fixed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from lokr_trainer.data.images import IMAGE_EXTENSIONS
from lokr_trainer.data.records import SampleRecord, normalize_rating, parse_year
from lokr_trainer.errors import DataError, ManifestError

logger = logging.getLogger(__name__)

KEEP_SEPARATOR = "|||"
_CATEGORY_ALIASES = {
    "general": "general",
    "tags": "general",
    "character": "character",
    "characters": "character",
    "copyright": "copyright",
    "copyrights": "copyright",
    "series": "copyright",
    "artist": "artist",
    "artists": "artist",
    "meta": "meta",
}
_warned_categories: set[str] = set()
_DANBOORU_FIELDS = {
    "tag_string_general": "general",
    "tag_string_character": "character",
    "tag_string_copyright": "copyright",
    "tag_string_artist": "artist",
    "tag_string_meta": "meta",
}


def split_tags(value: Any, where: str = "") -> list[str]:
    """A list of tags, or a comma-separated string → list of stripped, non-empty tags."""
    if value is None:
        return []
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    if isinstance(value, (list, tuple)):
        out = []
        for t in value:
            if not isinstance(t, str):
                raise ManifestError(f"{where}: tags must be strings, got {t!r}")
            if t.strip():
                out.append(t.strip())
        return out
    raise ManifestError(f"{where}: tags must be a list or a comma-separated string, got {type(value).__name__}")


def _int_or_none(value: Any, name: str, where: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise ManifestError(f"{where}: {name} must be an integer, got {value!r}") from None


def apply_metadata(record: SampleRecord, meta: Mapping[str, Any], where: str) -> SampleRecord:
    """Fill ``record`` from a metadata mapping (schema in the module docstring); returns it."""
    if not isinstance(meta, Mapping):
        raise ManifestError(f"{where}: metadata must be a JSON object, got {type(meta).__name__}")
    tags: dict[str, list[str]] = {k: list(v) for k, v in record.tags.items()}
    raw = meta.get("tags")
    if isinstance(raw, Mapping):
        for k, v in raw.items():
            cat = _CATEGORY_ALIASES.get(str(k).lower())
            if cat is None:  # e.g. e621's "species", "lore": content tags, so they join the general tags
                cat = "general"
                if str(k) not in _warned_categories:
                    _warned_categories.add(str(k))
                    logger.warning("%s: tag category %r is not a danbooru one; its tags are used as general tags",
                                   where, k)  # fmt: skip
            tags.setdefault(cat, []).extend(split_tags(v, where))
    elif raw is not None:
        tags.setdefault("general", []).extend(split_tags(raw, where))
    for k, v in meta.items():
        if k in _CATEGORY_ALIASES and k != "tags":
            tags.setdefault(_CATEGORY_ALIASES[k], []).extend(split_tags(v, where))
    for k, cat in _DANBOORU_FIELDS.items():
        if isinstance(meta.get(k), str):
            tags.setdefault(cat, []).extend(meta[k].split())
    record.tags = tags
    if "rating" in meta and meta["rating"] is not None:
        r = normalize_rating(meta["rating"])
        if r is None:
            raise ManifestError(f"{where}: unknown rating {meta['rating']!r} (use g/s/q/e or their names)")
        record.rating = r
    for name in ("fav_count", "favs"):
        if name in meta:
            v = meta[name]
            record.fav_count = len(v) if isinstance(v, list) else _int_or_none(v, name, where)
            break
    for name in ("created_at", "date", "year", "upload_date"):
        if meta.get(name) not in (None, ""):
            record.year = parse_year(meta[name])
            break
    cap = meta.get("caption", meta.get("nl_caption"))
    if cap is not None:
        if not isinstance(cap, str):
            raise ManifestError(f"{where}: caption must be a string")
        record.caption = cap
    w = meta.get("width", meta.get("image_width"))
    h = meta.get("height", meta.get("image_height"))
    record.width = _side_or_none(w, "width", where) or record.width
    record.height = _side_or_none(h, "height", where) or record.height
    return record


#: Largest image side a sidecar may claim (Pillow's own limits are lower for most formats).
MAX_SIDE = 1 << 17


def _side_or_none(value: Any, name: str, where: str) -> int | None:
    """An image side from metadata: a whole number of pixels in [1, MAX_SIDE], never a bool or 1024.7."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ManifestError(f"{where}: {name} must be a whole number of pixels, got {value!r}")
    side = _int_or_none(value, name, where)
    if side is None or not 1 <= side <= MAX_SIDE:
        raise ManifestError(f"{where}: {name} = {value!r} is not an image size (1 to {MAX_SIDE} pixels); fix or remove it")
    return side


def apply_txt_caption(record: SampleRecord, text: str, keep_tokens: int = 0) -> SampleRecord:
    """Fill ``record`` from a ``.txt`` caption: ``head ||| general`` or plain comma-separated tags."""
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if KEEP_SEPARATOR in text:
        head, _, rest = text.partition(KEEP_SEPARATOR)
        record.head = split_tags(head)
        general = split_tags(rest.replace(KEEP_SEPARATOR, ","))
    else:
        general = split_tags(text)
        if keep_tokens > 0:
            record.head, general = general[:keep_tokens], general[keep_tokens:]
    record.tags.setdefault("general", []).extend(general)
    return record


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


@dataclass
class FolderSource:
    """Images in a folder (recursively), each with optional sidecars.

    Sidecars are looked up as ``name.json``/``name.txt`` then ``stem.json``/
    ``stem.txt`` (``a.png.json`` is what gallery-dl writes, ``a.txt`` what
    taggers write).  When both JSON and text exist, JSON supplies metadata and
    the text supplies tags only if the JSON had none.  A malformed sidecar is a
    :class:`ManifestError` naming the file: fix the data rather than train on
    half-read captions.
    """

    root: str | os.PathLike
    recursive: bool = True
    keep_tokens: int = 0

    def __iter__(self) -> Iterator[SampleRecord]:
        root = Path(self.root)
        if not root.is_dir():
            raise DataError(f"{root}: not a directory")
        walker = root.rglob("*") if self.recursive else root.glob("*")
        # everything named like an image: FIFOs, folders and broken links named *.png become
        # records too, so that indexing logs and counts them instead of passing them over
        files = sorted(p for p in walker if p.suffix.lower() in IMAGE_EXTENSIONS)
        for p in files:
            yield self._record(root, p)

    def _record(self, root: Path, p: Path) -> SampleRecord:
        rec = SampleRecord(key=p.relative_to(root).as_posix(), path=str(p), source=str(root))
        js = next((c for c in (p.with_name(p.name + ".json"), p.with_suffix(".json")) if c.is_file()), None)
        tx = next((c for c in (p.with_name(p.name + ".txt"), p.with_suffix(".txt")) if c.is_file()), None)
        if js is not None:
            apply_metadata(rec, _read_json(js), str(js))
        if tx is not None and not any(rec.tags.values()) and not rec.head:
            apply_txt_caption(rec, _read_text(tx), self.keep_tokens)
        return rec


@dataclass
class ManifestSource:
    """A JSONL manifest, one JSON object per line with a ``path`` (schema above).

    Relative paths are resolved against ``root`` (default: the manifest's
    folder).  Blank lines are ignored; a malformed line raises
    :class:`ManifestError` with file and line number.  Missing image files are
    not checked here; they are skipped and counted when the dataset is indexed.
    """

    path: str | os.PathLike
    root: str | os.PathLike | None = None

    def __iter__(self) -> Iterator[SampleRecord]:
        path = Path(self.path)
        root = Path(self.root) if self.root is not None else path.parent
        try:
            fh = path.open("r", encoding="utf-8-sig")
        except OSError as e:
            raise DataError(f"{path}: cannot open manifest: {e}") from None
        with fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    meta = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(meta, dict) or not isinstance(meta.get("path"), str) or not meta["path"]:
                    raise ManifestError(f"{where}: each line needs a non-empty string 'path'")
                rel = meta["path"]
                img = Path(rel) if os.path.isabs(rel) else root / rel
                rec = SampleRecord(key=str(meta.get("key", rel)), path=str(img), source=where)
                yield apply_metadata(rec, meta, where)


_IMAGE_MEMBER_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "avif", "jxl")


def _expand_urls(urls: str | Sequence[str]) -> list[str]:
    from webdataset import shardlists

    if isinstance(urls, str):
        return list(shardlists.expand_urls(urls))
    out: list[str] = []
    for u in urls:
        out.extend(shardlists.expand_urls(u))
    return out


def _require_webdataset() -> None:
    try:
        import webdataset  # noqa: F401
    except ImportError:
        raise DataError(
            "tar shards need the optional 'webdataset' package: pip install 'lokr-trainer[webdataset]'"
        ) from None


_KEY_EXT = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")


@dataclass(frozen=True)
class MemberSpan:
    """Where an image member's bytes lie in a local uncompressed shard (read later, in place)."""

    offset: int
    size: int


#: magic numbers of gzip, bzip2, xz and zstd: such shards must be streamed, not read in place
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


def _local_plain_tar(url: str) -> str | None:
    """The path of a shard that is a local, uncompressed tar file (its images can be read in place)."""
    path = url[len("file://"):] if url.startswith("file://") else url
    if "://" in path or path.startswith("pipe:") or not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as fh:
            head = fh.read(6)
    except OSError:
        return None
    return None if head.startswith(_COMPRESSED_MAGIC) else path


def _group_members(fileobj: Any, in_place: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream a tar file as webdataset samples: consecutive members sharing a key (name up to the
    first dot of the file name) form one sample ``{"__key__": key, ext: bytes, ...}``.

    ``in_place`` (a seekable, uncompressed shard): image members become a :class:`MemberSpan`
    and their bytes are skipped, so indexing a shard set reads its headers and captions only.
    """
    current: dict[str, Any] | None = None
    with tarfile.open(fileobj=fileobj, mode="r:" if in_place else "r|*") as tf:
        for info in tf:
            if not info.isreg():
                continue
            m = _KEY_EXT.match(info.name)
            if m is None or "/__" in "/" + info.name:
                continue
            key, ext = m.group(1), m.group(2).lower()
            if in_place and ext in _IMAGE_MEMBER_EXTS and not info.issparse():
                # (a sparse member's stored bytes are not its content: those are read, as when streaming)
                data: Any = MemberSpan(info.offset_data, info.size)
            else:
                f = tf.extractfile(info)
                data = f.read() if f is not None else b""
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current["__key__"], current
                current = {"__key__": key}
            current[ext] = data
    if current is not None:
        yield current["__key__"], current


def sample_from_members(
    members: Mapping[str, Any], where: str, keep_tokens: int = 0, shard_stamp: tuple[int, int] | None = None
) -> SampleRecord | None:
    """Turn one webdataset sample (``{"__key__": ..., "jpg": bytes, "json": bytes, ...}``) into a record.

    Returns ``None`` when the sample has no image member (logged by the caller).
    """
    key = str(members.get("__key__", ""))
    ext = next((e for e in _IMAGE_MEMBER_EXTS if e in members), None)
    if ext is None:
        return None
    image = members[ext]
    if isinstance(image, MemberSpan):
        rec = SampleRecord(key=key, path=where, offset=image.offset, size=image.size, source=where,
                           shard_stamp=shard_stamp)
    else:
        rec = SampleRecord(key=key, data=bytes(image), source=where)
    if "json" in members:
        try:
            meta = json.loads(bytes(members["json"]).decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"{where}:{key}.json: invalid JSON ({e})") from None
        apply_metadata(rec, meta, f"{where}:{key}.json")
    for cap_ext in ("txt", "caption", "tags"):
        if cap_ext in members and not any(rec.tags.values()) and not rec.head:
            apply_txt_caption(rec, bytes(members[cap_ext]).decode("utf-8-sig", errors="replace"), keep_tokens)
            break
    return rec


@dataclass
class WebDatasetSource:
    """Streams samples from webdataset tar shards (local paths, ``pipe:`` or http URLs).

    Brace patterns (``shards/{000000..000999}.tar``) are expanded by
    webdataset.  ``shard_range(rank, world)`` splits shards between
    processes; a shard that cannot be read is logged, counted in
    :attr:`bad_shards` and skipped.  Needs ``pip install
    'lokr-trainer[webdataset]'``.
    """

    urls: str | Sequence[str]
    keep_tokens: int = 0

    def __post_init__(self) -> None:
        _require_webdataset()
        self.shards = _expand_urls(self.urls)
        if not self.shards:
            raise DataError(f"no shards match {self.urls!r}")
        self.bad_shards: list[str] = []
        self.missing_image: int = 0

    def iter_shards(self, shards: Iterable[str]) -> Iterator[SampleRecord]:
        import webdataset as wds

        for url in shards:
            local = _local_plain_tar(url)
            try:
                stream = open(local, "rb") if local is not None else wds.gopen(url)
            except Exception as e:  # noqa: BLE001 - any transport error: skip the shard
                self._bad(url, e)
                continue
            stamp = None
            if local is not None:
                st = os.fstat(stream.fileno())
                stamp = (st.st_size, st.st_mtime_ns)
            try:
                for key, members in _group_members(stream, in_place=local is not None):
                    rec = sample_from_members(members, local or url, self.keep_tokens, stamp)
                    if rec is None:
                        self.missing_image += 1
                        logger.warning("%s: sample %r has no image member; skipped", url, key)
                        continue
                    yield rec
            except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as e:
                self._bad(url, e)  # corrupt or cut-off shard: keep what was read, skip the rest
            finally:
                try:
                    stream.close()
                except Exception:  # noqa: BLE001
                    pass

    def _bad(self, url: str, err: Exception) -> None:
        self.bad_shards.append(url)
        logger.warning("skipping (rest of) shard %s: %s", url, err)

    def shard_range(self, rank: int = 0, world: int = 1) -> list[str]:
        """The shards one of ``world`` consumers reads (every ``world``-th, from ``rank``)."""
        return self.shards[rank::world]

    def __iter__(self) -> Iterator[SampleRecord]:
        return self.iter_shards(self.shards)


def open_source(spec: str | os.PathLike, keep_tokens: int = 0) -> Iterable[SampleRecord]:
    """Pick the source type from a path: folder, ``*.jsonl`` manifest, or ``*.tar`` shard pattern."""
    s = os.fspath(spec)
    if os.path.isdir(s):
        return FolderSource(s, keep_tokens=keep_tokens)
    if s.endswith((".jsonl", ".json")) and os.path.isfile(s):
        return ManifestSource(s)
    if re.search(r"\.tar(\.gz)?(\}|$)|\{.*\}", s) or s.startswith(("pipe:", "http://", "https://", "s3://")):
        return WebDatasetSource(s, keep_tokens=keep_tokens)
    raise DataError(f"{s}: not a folder, a .jsonl manifest or a .tar shard pattern")
