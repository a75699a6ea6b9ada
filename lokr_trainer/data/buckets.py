"""Aspect-ratio buckets: generation, assignment, resize-to-cover and crop.

Why our own rules rather than kohya's: kohya's generator lets a side cap push
a bucket's area far below resolution² and measures aspect error as
``|w/h - W/H|``, which favours portrait over landscape.  We measure aspect
distance as ``|log(w/h) - log(W/H)|`` (symmetric: a 2:1 and a 1:2 image are
equally far from square) and report crop offsets *in resized pixels*, which is
what SDXL's ``crop_coords_top_left`` means (kohya #1443 reports a "contain"
offset instead).

Conventions: sizes are ``(width, height)`` in pixels unless a name ends in
``_hw``; time ids use SDXL's order ``(orig_h, orig_w, top, left, target_h,
target_w)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np

from lokr_trainer.errors import ConfigError

CropMode = Literal["center", "random"]


@dataclass(frozen=True, order=True)
class Bucket:
    """A target size ``width × height``; both sides are multiples of the bucket step."""

    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def area(self) -> int:
        return self.width * self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class BucketConfig:
    """Bucket generation settings (recipes: 1024, step 64, sides 256–4096)."""

    resolution: int = 1024
    step: int = 64
    min_side: int = 256
    max_side: int = 4096

    def validate(self) -> None:
        if self.step <= 0 or self.step % 8:
            raise ConfigError(
                f"bucket step must be a positive multiple of 8 (the VAE downsamples by 8), got {self.step}"
            )
        for name in ("min_side", "max_side"):
            v = getattr(self, name)
            if v <= 0 or v % self.step:
                raise ConfigError(f"bucket {name}={v} must be a positive multiple of step={self.step}")
        if self.min_side > self.max_side:
            raise ConfigError(f"bucket min_side={self.min_side} is larger than max_side={self.max_side}")
        if self.resolution < self.min_side:
            raise ConfigError(
                f"resolution={self.resolution} is below min_side={self.min_side}; no bucket could be made"
            )
        if self.min_side * self.min_side > self.resolution**2:
            raise ConfigError(f"min_side={self.min_side} squared exceeds resolution²={self.resolution**2}")


def make_buckets(config: BucketConfig = BucketConfig()) -> list[Bucket]:
    """All buckets for ``config``, sorted by aspect ratio (tall → wide).

    A bucket ``w × h`` has both sides multiples of ``step`` in
    ``[min_side, max_side]`` and area ``≤ resolution²``, and is the largest
    bucket of its shape: neither side can grow by one step without breaking
    the area budget or ``max_side``.  Where ``max_side`` caps the long side,
    every short side from ``min_side`` up is kept (``256×2048``, ``320×2048``,
    …), so extreme aspects still find a close bucket even though its area is
    below resolution².  Unlike kohya's generator this makes no near-duplicate
    low-area buckets (``256×3328`` next to ``256×4096``).  The set is
    symmetric: the transpose of a bucket is a bucket.
    """
    config.validate()
    s, area = config.step, config.resolution**2

    def longest(side: int) -> int:
        return min(config.max_side, (area // side) // s * s)

    out: set[Bucket] = set()
    for w in range(config.min_side, config.max_side + 1, s):
        h = longest(w)
        if h >= config.min_side and (longest(h) == w or h == config.max_side):
            out.add(Bucket(w, h))
            out.add(Bucket(h, w))
    return sorted(out, key=lambda b: (b.aspect, b.area))


class BucketSet:
    """A fixed list of buckets with fast nearest-aspect lookup.

    The bucket id of an image is its index in :attr:`buckets`; ids are stable
    for a given :class:`BucketConfig`.
    """

    def __init__(self, buckets: Sequence[Bucket]) -> None:
        if not buckets:
            raise ConfigError("a bucket set needs at least one bucket")
        self.buckets: list[Bucket] = list(buckets)
        self._log_ar = np.array([math.log(b.aspect) for b in self.buckets])
        self._area = np.array([b.area for b in self.buckets], dtype=np.int64)
        self._index = {b: i for i, b in enumerate(self.buckets)}

    @classmethod
    def from_config(cls, config: BucketConfig = BucketConfig()) -> "BucketSet":
        return cls(make_buckets(config))

    def __len__(self) -> int:
        return len(self.buckets)

    def __getitem__(self, i: int) -> Bucket:
        return self.buckets[i]

    def index(self, bucket: Bucket) -> int:
        return self._index[bucket]

    def assign(self, width: int, height: int) -> int:
        """Id of the bucket whose aspect ratio is nearest (log distance) to ``width/height``.

        Ties (equal aspect distance) go to the larger bucket, then the lower id.
        """
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        d = np.abs(self._log_ar - math.log(width / height))
        best = d.min()
        cand = np.flatnonzero(d <= best + 1e-12)
        if len(cand) == 1:
            return int(cand[0])
        return int(cand[np.argmax(self._area[cand])])

    def assign_many(self, sizes: Iterable[tuple[int, int]]) -> np.ndarray:
        """Vectorised :meth:`assign` for ``(width, height)`` pairs."""
        wh = np.asarray(list(sizes), dtype=np.float64).reshape(-1, 2)
        if len(wh) == 0:
            return np.zeros(0, dtype=np.int64)
        if (wh <= 0).any():
            raise ValueError("image sizes must be positive")
        d = np.abs(self._log_ar[None, :] - np.log(wh[:, 0] / wh[:, 1])[:, None])
        best = d.min(axis=1, keepdims=True)
        # Among near-equal distances prefer the larger area: score ties by area.
        tie = d <= best + 1e-12
        score = np.where(tie, self._area[None, :], -1)
        return score.argmax(axis=1).astype(np.int64)


@dataclass(frozen=True)
class CropPlan:
    """How one image becomes one bucket-sized picture.

    The image (``orig_w × orig_h``, after EXIF rotation) is resized to
    ``resized_w × resized_h`` (covering the bucket, aspect kept up to rounding),
    then the window ``[left, left+bucket.width) × [top, top+bucket.height)`` is
    cut out, then mirrored when ``flip``.  ``crop_left`` / ``crop_top`` are the
    offsets SDXL's time ids get: in resized pixels, and for a flipped sample
    measured in the mirrored image (``resized_w - left - bucket.width``).
    """

    orig_w: int
    orig_h: int
    bucket: Bucket
    resized_w: int
    resized_h: int
    left: int
    top: int
    flip: bool = False

    @property
    def crop_left(self) -> int:
        return self.resized_w - self.left - self.bucket.width if self.flip else self.left

    @property
    def crop_top(self) -> int:
        return self.top

    @property
    def scale(self) -> float:
        return max(self.resized_w / self.orig_w, self.resized_h / self.orig_h)

    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        """SDXL ``add_time_ids``: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
        return (
            self.orig_h,
            self.orig_w,
            self.crop_top,
            self.crop_left,
            self.bucket.height,
            self.bucket.width,
        )

    def source_box(self) -> tuple[float, float, float, float]:
        """The crop window mapped back to original pixels (for a one-step resize)."""
        sx = self.resized_w / self.orig_w
        sy = self.resized_h / self.orig_h
        return (
            self.left / sx,
            self.top / sy,
            (self.left + self.bucket.width) / sx,
            (self.top + self.bucket.height) / sy,
        )


def cover_size(orig_w: int, orig_h: int, bucket: Bucket) -> tuple[int, int]:
    """Smallest aspect-preserving size (rounded) that covers ``bucket`` on both sides."""
    s = max(bucket.width / orig_w, bucket.height / orig_h)
    rw = max(bucket.width, int(round(orig_w * s)))
    rh = max(bucket.height, int(round(orig_h * s)))
    return rw, rh


def plan_crop(
    orig_w: int,
    orig_h: int,
    bucket: Bucket,
    mode: CropMode = "center",
    rng: np.random.Generator | None = None,
    flip: bool = False,
) -> CropPlan:
    """Resize-to-cover then crop ``orig_w × orig_h`` into ``bucket``.

    ``center`` takes the middle (extra odd pixel goes right/bottom); ``random``
    draws the offset uniformly from ``rng`` (required), so the same generator
    state always gives the same crop.
    """
    rw, rh = cover_size(orig_w, orig_h, bucket)
    ex, ey = rw - bucket.width, rh - bucket.height
    if mode == "center":
        left, top = ex // 2, ey // 2
    elif mode == "random":
        if rng is None:
            raise ValueError("random crop needs a seeded numpy Generator")
        left = int(rng.integers(0, ex + 1))
        top = int(rng.integers(0, ey + 1))
    else:
        raise ConfigError(f"crop mode must be 'center' or 'random', got {mode!r}")
    return CropPlan(orig_w, orig_h, bucket, rw, rh, left, top, flip)
