"""Robust image decoding: every file either becomes an sRGB picture or a :class:`BadImageError`.

A multi-day run must survive whatever a scraped dataset contains, so each
hazard has one explicit rule:

* zero-byte file, non-image with an image extension, truncated data, corrupt
  headers → :class:`BadImageError` (``kind`` says which); the caller logs the
  path, counts it and goes on (:class:`SkipLog`);
* more than ``max_pixels`` pixels (decompression bombs) → refused from the
  header, before any pixel is decoded;
* EXIF orientation → applied, and the *rotated* size is the original size the
  time ids get;
* alpha (RGBA, LA, palette with ``transparency``) → composited on ``background``
  (white by default), never dropped to black;
* 16-bit grayscale → scaled to 8 bits (a plain ``convert`` would clip to white);
* CMYK and images with an ICC profile → converted to sRGB through LittleCMS
  when available;
* JPEGs far larger than their target are decoded at 1/2, 1/4 or 1/8 scale by
  libjpeg (``draft``), never below the size the crop needs.

Pillow's process-wide settings (``MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES``)
are left untouched.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import struct
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import BinaryIO, Callable, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lokr_trainer.data.buckets import CropPlan
from lokr_trainer.errors import BadImageError

logger = logging.getLogger(__name__)

#: A path, encoded bytes, or an open binary file (a tar member's window: header reads only)
ImageSource = Union[str, os.PathLike, bytes, BinaryIO]

#: Default pixel limit: Pillow's own hard limit (2 × ``Image.MAX_IMAGE_PIXELS``),
#: about 179 megapixels, i.e. 537 MB as 8-bit RGB.
DEFAULT_MAX_PIXELS = 2 * 89_478_485

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".jxl"}
)

# EXIF orientations that swap width and height.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    IndexError,
    TypeError,
    KeyError,
    MemoryError,
)


@dataclass(frozen=True)
class DecodeOptions:
    """How images are decoded.

    Attributes:
        max_pixels: refuse images with more pixels than this (header check).
        background: RGB colour transparent pixels are composited onto.
        color_manage: convert embedded ICC profiles (and CMYK) to sRGB.
        jpeg_draft: let libjpeg decode big JPEGs at a reduced scale that still
            covers the crop (2–5× faster for 4-megapixel sources, same result
            within resampling noise).
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    background: tuple[int, int, int] = (255, 255, 255)
    color_manage: bool = True
    jpeg_draft: bool = True


def _where(src: ImageSource, where: str | None) -> str:
    if where is not None:
        return where
    if isinstance(src, (bytes, bytearray)):
        return "<bytes>"
    return os.fspath(src) if isinstance(src, (str, os.PathLike)) else str(getattr(src, "name", "<file>"))


def _open(src: ImageSource, where: str, opts: DecodeOptions) -> Image.Image:
    """Open lazily (header only), refusing empty files, non-images and oversized images."""
    if isinstance(src, (bytes, bytearray)):
        if len(src) == 0:
            raise BadImageError(where, "empty data (0 bytes)", kind="empty")
        fp: object = io.BytesIO(src)
    elif hasattr(src, "read"):
        if src.seek(0, os.SEEK_END) == 0:
            raise BadImageError(where, "empty data (0 bytes)", kind="empty")
        src.seek(0)
        fp = src
    else:
        try:
            st = os.stat(src)
        except FileNotFoundError:
            if os.path.islink(src):
                raise BadImageError(where, f"broken symbolic link (to {os.readlink(src)})", kind="missing") from None
            raise BadImageError(where, "file not found", kind="missing") from None
        except OSError as e:
            raise BadImageError(where, f"cannot read file: {e}", kind="unreadable") from None
        if not stat.S_ISREG(st.st_mode):  # opening a FIFO would block the run forever
            what = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
            raise BadImageError(where, f"is {what}, not an image file", kind="not_an_image")
        if st.st_size == 0:
            raise BadImageError(where, "empty file (0 bytes)", kind="empty")
        fp = os.fspath(src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)  # type: ignore[arg-type]
    except Image.DecompressionBombError as e:
        raise BadImageError(where, f"refused as a decompression bomb ({e})", kind="too_large") from None
    except UnidentifiedImageError:
        raise BadImageError(where, "not an image Pillow can identify", kind="not_an_image") from None
    except _DECODE_ERRORS as e:
        raise BadImageError(where, f"unreadable image header: {e}", kind="unreadable") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadImageError(where, f"invalid size {w}x{h}", kind="unreadable")
    if w * h > opts.max_pixels:
        raise BadImageError(
            where,
            f"{w}x{h} = {w * h} pixels exceeds max_pixels={opts.max_pixels} (decompression bomb guard)",
            kind="too_large",
        )
    return img


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # malformed EXIF must not lose the image
        return 1


def probe_size(src: ImageSource, where: str | None = None, opts: DecodeOptions = DecodeOptions()) -> tuple[int, int]:
    """Displayed ``(width, height)`` (EXIF rotation applied) from the header only.

    Raises :class:`BadImageError` for files that cannot even be identified;
    truncation inside the pixel data is only found by :func:`decode_image`.
    """
    where = _where(src, where)
    img = _open(src, where, opts)
    try:
        w, h = img.size
        if _orientation(img) in _TRANSPOSING_ORIENTATIONS:
            w, h = h, w
        return w, h
    finally:
        img.close()


@lru_cache(maxsize=32)
def _icc_transform(profile: bytes, mode: str):  # pragma: no cover - depends on LittleCMS build
    from PIL import ImageCms

    src = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    dst = ImageCms.createProfile("sRGB")
    return ImageCms.buildTransform(src, dst, mode, "RGB")


def _to_rgb(img: Image.Image, opts: DecodeOptions, where: str) -> Image.Image:
    """Any Pillow mode → 8-bit sRGB ``RGB``; alpha composited on the background."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr = arr.astype(np.float64)
            top = 1.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 255.0
            arr8 = np.clip(np.nan_to_num(arr) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        else:
            arr = arr.astype(np.int64)
            # 16-bit data (PNG, TIFF) arrives as I;16 or as I with values ≤ 65535.
            maxval = 255 if arr.max(initial=0) <= 255 else 65535
            arr8 = np.clip((arr * 255 + maxval // 2) // maxval, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    icc = img.info.get("icc_profile") if opts.color_manage else None
    if mode == "CMYK" or (icc and mode == "RGB"):
        if icc:
            try:
                return _apply_icc(img, icc, mode)
            except Exception as e:  # broken profile: fall back to the naive conversion
                logger.debug("%s: ICC conversion failed (%s); converting without profile", where, e)
        return img.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, opts.background)
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if mode == "RGB":
        return img
    return img.convert("RGB")


def _apply_icc(img: Image.Image, icc: bytes, mode: str) -> Image.Image:
    from PIL import ImageCms

    return ImageCms.applyTransform(img, _icc_transform(bytes(icc), mode))


def decode_image(
    src: ImageSource,
    where: str | None = None,
    opts: DecodeOptions = DecodeOptions(),
    min_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Fully decode ``src`` into an upright 8-bit sRGB ``RGB`` image.

    ``min_size`` (displayed width, height) allows a reduced-scale JPEG decode
    that is still at least that large; the returned image is then smaller than
    the original, so callers that need the original size use
    :func:`load_cropped`, which accounts for it.
    """
    return _decode(src, _where(src, where), opts, lambda w, h: min_size)[0]


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
#: Adam7 passes: (x start, y start, x step, y step)
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_missing_rows(data: bytes) -> int:
    """How many bytes of pixel data a PNG lacks (0 when complete).

    Pillow decodes a PNG whose compressed data ends cleanly but early without
    an error and leaves the missing rows black; a training image like that is
    worse than a skipped one.  The IHDR gives the exact size of the filtered
    rows, so the IDAT stream is inflated (into a counter, not kept) and
    compared with it.
    """
    if len(data) < 33 or data[:8] != b"\x89PNG\r\n\x1a\n":
        return 0
    w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    bits = _PNG_CHANNELS.get(color, 0) * depth
    if not bits:
        return 0

    def rows(pw: int, ph: int) -> int:
        return 0 if pw == 0 or ph == 0 else ph * (1 + (pw * bits + 7) // 8)

    if interlace:
        expected = sum(rows((w - x0 + dx - 1) // dx, (h - y0 + dy - 1) // dy) for x0, y0, dx, dy in _ADAM7)
    else:
        expected = rows(w, h)
    inflate, got, pos = zlib.decompressobj(), 0, 8
    while pos + 8 <= len(data) and got < expected:
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IDAT":
            chunk = data[pos + 8 : pos + 8 + length]
            while chunk and got < expected:
                got += len(inflate.decompress(chunk, expected - got))
                chunk = inflate.unconsumed_tail
        elif kind == b"IEND":
            break
        pos += 12 + length
    return max(0, expected - got)


def _read_bytes(src: ImageSource) -> bytes:
    if isinstance(src, (bytes, bytearray)):
        return bytes(src)
    with open(src, "rb") as f:
        return f.read()


def _decode(
    src: ImageSource,
    where: str,
    opts: DecodeOptions,
    need: Callable[[int, int], tuple[int, int] | None],
) -> tuple[Image.Image, tuple[int, int]]:
    img = _open(src, where, opts)
    opened = img
    try:
        w, h = img.size
        orient = _orientation(img)
        transposed = orient in _TRANSPOSING_ORIENTATIONS
        disp = (h, w) if transposed else (w, h)
        want = need(*disp)
        if opts.jpeg_draft and want is not None and img.format == "JPEG":
            req = (want[1], want[0]) if transposed else want
            img.draft(None, (max(1, req[0]), max(1, req[1])))
        try:
            img.load()
            if img.format == "PNG":
                missing = png_missing_rows(_read_bytes(src))
                if missing:
                    raise BadImageError(
                        where, f"the PNG's pixel data ends early ({missing} bytes missing): its last rows would be black",
                        kind="truncated",
                    )
            if orient != 1:
                img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img, opts, where)
        except Image.DecompressionBombError as e:
            raise BadImageError(where, f"refused as a decompression bomb ({e})", kind="too_large") from None
        except _DECODE_ERRORS as e:
            msg = str(e)
            kind = "truncated" if "truncated" in msg or isinstance(e, EOFError) else "unreadable"
            raise BadImageError(where, f"cannot decode: {msg or type(e).__name__}", kind=kind) from None
    except BaseException:
        opened.close()
        raise
    if rgb is not opened:
        opened.close()  # the file handle; the returned image owns its own pixels
    return rgb, disp


def load_cropped(
    src: ImageSource,
    plan_for: Callable[[int, int], CropPlan],
    where: str | None = None,
    opts: DecodeOptions = DecodeOptions(),
) -> tuple[np.ndarray, CropPlan]:
    """Decode, resize to cover, crop and flip in one pass.

    ``plan_for(orig_w, orig_h)`` receives the image's displayed size (known
    once the header is read) and returns the :class:`CropPlan`; using the
    actual size here means a wrong size in a manifest cannot produce a wrong
    crop.  Returns ``(H, W, 3)`` uint8 RGB of the bucket size and the plan.
    """
    where = _where(src, where)
    holder: dict[str, CropPlan] = {}

    def need(w: int, h: int) -> tuple[int, int]:
        plan = plan_for(w, h)
        holder["plan"] = plan
        return (plan.resized_w, plan.resized_h)

    img, (ow, oh) = _decode(src, where, opts, need)
    plan = holder["plan"]
    # The decoded image may be a reduced-scale draft; map the crop window onto it.
    fx, fy = img.size[0] / ow, img.size[1] / oh
    x0, y0, x1, y1 = plan.source_box()
    box = (x0 * fx, y0 * fy, x1 * fx, y1 * fy)
    try:
        out = img.resize((plan.bucket.width, plan.bucket.height), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    finally:
        img.close()
    if plan.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.array(out, dtype=np.uint8)  # writable (torch.from_numpy warns on read-only arrays)
    if arr.shape != (plan.bucket.height, plan.bucket.width, 3):  # pragma: no cover - Pillow contract
        raise BadImageError(where, f"unexpected decoded shape {arr.shape}")
    return arr, plan


def to_tensor(arr: np.ndarray):
    """``(H, W, 3)`` uint8 → ``(3, H, W)`` float32 in ``[-1, 1]`` (the VAE's input range)."""
    import torch

    # numpy does the layout change and scaling single-threaded: 2-3x faster than torch's
    # permute+float in DataLoader workers, and bit-identical.
    a = arr.transpose(2, 0, 1).astype(np.float32)
    a /= np.float32(127.5)
    a -= np.float32(1.0)
    return torch.from_numpy(a)


class SkipLog:
    """Counts and logs skipped samples: every skip is logged with its path, once.

    Kept by the main process (workers send their skips back inside the batch,
    see :func:`lokr_trainer.data.dataset.collate`), so the summary is complete
    even with DataLoader worker processes.
    """

    def __init__(self, log: logging.Logger | None = None, max_examples: int = 20) -> None:
        self.log = log or logger
        self.max_examples = max_examples
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self._seen: set[str] = set()

    def add(self, where: str, reason: str, kind: str = "unreadable") -> None:
        """Record one skip; the same path is logged and counted only once."""
        if where in self._seen:
            return
        self._seen.add(where)
        self.counts[kind] += 1
        ex = self.examples.setdefault(kind, [])
        if len(ex) < self.max_examples:
            ex.append(where)
        self.log.warning("skipping %s: %s", where, reason)

    def add_batch(self, batch: dict) -> None:
        """Log and count the samples a DataLoader worker skipped (``batch["skipped"]``, see ``collate``)."""
        for where, reason, kind in batch.get("skipped", ()):
            self.add(where, reason, kind)

    def add_error(self, err: BadImageError) -> None:
        self.add(err.path or "<bytes>", err.reason, err.kind)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line per kind, e.g. ``skipped 3 images: truncated 2, empty 1``."""
        if not self.total:
            return "skipped 0 images"
        parts = ", ".join(f"{k} {n}" for k, n in sorted(self.counts.items()))
        return f"skipped {self.total} images: {parts}"

    def as_dict(self) -> dict[str, object]:
        return {"total": self.total, "by_kind": dict(self.counts), "examples": self.examples}
