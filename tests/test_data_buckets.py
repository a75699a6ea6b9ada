"""Aspect-ratio buckets: generation rules, nearest-aspect assignment, cover+crop, time ids."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lokr_trainer.data.buckets import Bucket, BucketConfig, BucketSet, cover_size, make_buckets, plan_crop
from lokr_trainer.errors import ConfigError

RECIPE = BucketConfig(resolution=1024, step=64, min_side=256, max_side=4096)


def random_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """Sizes like a scraped dataset: log-uniform sides 64..8000 and aspect 1:20..20:1."""
    rng = np.random.default_rng(seed)
    area = np.exp(rng.uniform(np.log(64 * 64), np.log(6000 * 6000), n))
    ar = np.exp(rng.uniform(np.log(1 / 20), np.log(20), n))
    w = np.maximum(1, np.round(np.sqrt(area * ar))).astype(int)
    h = np.maximum(1, np.round(np.sqrt(area / ar))).astype(int)
    sizes = list(zip(w.tolist(), h.tolist()))
    return sizes + [(1, 1), (1, 5000), (5000, 1), (1024, 1024), (832, 1216), (1216, 832), (3, 2)]


@pytest.mark.parametrize(
    "cfg",
    [RECIPE, BucketConfig(1024, 64, 256, 2048), BucketConfig(768, 32, 256, 1536), BucketConfig(512, 64, 64, 1024)],
)
def test_bucket_generation_rules(cfg: BucketConfig) -> None:
    buckets = make_buckets(cfg)
    assert len(buckets) == len(set(buckets))
    for b in buckets:
        assert b.width % cfg.step == 0 and b.height % cfg.step == 0
        assert cfg.min_side <= b.width <= cfg.max_side and cfg.min_side <= b.height <= cfg.max_side
        assert b.area <= cfg.resolution**2
        # largest of its shape: growing either side by a step breaks the area budget or the side cap,
        # unless the other side sits on the cap (extreme aspects under max_side)
        for side, other in ((b.width, b.height), (b.height, b.width)):
            grown = side + cfg.step
            assert grown * other > cfg.resolution**2 or grown > cfg.max_side or other == cfg.max_side
        assert Bucket(b.height, b.width) in buckets  # symmetric set
    # sorted tall → wide
    assert [b.aspect for b in buckets] == sorted(b.aspect for b in buckets)
    # the square bucket exists when the resolution is a multiple of the step
    if cfg.resolution % cfg.step == 0:
        assert Bucket(cfg.resolution, cfg.resolution) in buckets


def test_recipe_buckets_pinned() -> None:
    buckets = set(make_buckets(RECIPE))
    for wh in [(1024, 1024), (832, 1216), (1216, 832), (896, 1152), (768, 1344), (256, 4096), (4096, 256)]:
        assert Bucket(*wh) in buckets
    assert Bucket(1024, 1088) not in buckets  # over the area budget
    assert Bucket(256, 4032) not in buckets  # no near-duplicate low-area buckets
    assert len(buckets) == 25
    assert min(b.area for b in buckets) / 1024**2 > 0.95  # every recipe bucket is close to 1024²


def test_side_cap_keeps_extreme_aspects() -> None:
    buckets = set(make_buckets(BucketConfig(1024, 64, 256, 2048)))
    for w in (256, 320, 384, 448, 512):
        assert Bucket(w, 2048) in buckets and Bucket(2048, w) in buckets
    assert Bucket(192, 2048) not in buckets  # below min_side


def test_assignment_is_nearest_aspect_over_thousands_of_sizes() -> None:
    bs = BucketSet.from_config(RECIPE)
    sizes = random_sizes(5000)
    ids = bs.assign_many(sizes)
    log_ar = np.array([math.log(b.aspect) for b in bs.buckets])
    for (w, h), i in zip(sizes, ids):
        d = np.abs(log_ar - math.log(w / h))
        assert d[i] <= d.min() + 1e-12, (w, h, bs[i])
        assert bs.assign(w, h) == i  # scalar and vectorised agree
    # a size that is a bucket maps to itself
    for b in bs.buckets:
        assert bs[bs.assign(b.width, b.height)] == b


def test_assignment_ties_prefer_larger_bucket() -> None:
    bs = BucketSet([Bucket(512, 512), Bucket(1024, 1024), Bucket(1024, 512)])
    assert bs[bs.assign(700, 700)] == Bucket(1024, 1024)


def test_cover_and_crop_properties_over_thousands_of_sizes() -> None:
    bs = BucketSet.from_config(RECIPE)
    rng = np.random.default_rng(1)
    for w, h in random_sizes(3000, seed=2):
        b = bs[bs.assign(w, h)]
        rw, rh = cover_size(w, h, b)
        assert rw >= b.width and rh >= b.height
        assert rw == b.width or rh == b.height  # covers tightly: one side matches
        s = max(b.width / w, b.height / h)
        assert abs(rw - w * s) <= 0.5 + 1e-9 and abs(rh - h * s) <= 0.5 + 1e-9  # aspect kept up to rounding
        for mode in ("center", "random"):
            flip = bool(rng.random() < 0.5)
            p = plan_crop(w, h, b, mode, np.random.default_rng([w, h]), flip=flip)
            assert 0 <= p.left <= rw - b.width and 0 <= p.top <= rh - b.height
            if mode == "center":
                assert (p.left, p.top) == ((rw - b.width) // 2, (rh - b.height) // 2)
            # what the time ids get: original (displayed) size, crop offsets in resized pixels, target
            expect_left = rw - p.left - b.width if flip else p.left
            assert p.time_ids() == (h, w, p.top, expect_left, b.height, b.width)
            assert p.crop_left == expect_left and p.crop_top == p.top
            x0, y0, x1, y1 = p.source_box()
            assert -1e-9 <= x0 < x1 <= w + 1e-6 and -1e-9 <= y0 < y1 <= h + 1e-6


def test_random_crop_is_deterministic_and_covers_the_range() -> None:
    b = Bucket(1024, 1024)
    draws = [plan_crop(2048, 1024, b, "random", np.random.default_rng([7, i])).left for i in range(400)]
    again = [plan_crop(2048, 1024, b, "random", np.random.default_rng([7, i])).left for i in range(400)]
    assert draws == again
    assert min(draws) < 100 and max(draws) > 924 and len(set(draws)) > 300  # uniform over [0, 1024]
    with pytest.raises(ValueError):
        plan_crop(2048, 1024, b, "random", None)


def test_kohya_1443_case_reports_real_trim() -> None:
    # 800x1200 into 832x1216: resized 832x1248, 32 px trimmed vertically → centre offset 16 from the top
    p = plan_crop(800, 1200, Bucket(832, 1216))
    assert (p.resized_w, p.resized_h) == (832, 1248)
    assert p.time_ids() == (1200, 800, 16, 0, 1216, 832)


@pytest.mark.parametrize(
    "kwargs",
    [dict(step=60), dict(min_side=300), dict(min_side=2048, max_side=1024), dict(resolution=128), dict(step=0)],
)
def test_bad_bucket_configs_are_refused(kwargs) -> None:
    with pytest.raises(ConfigError):
        make_buckets(BucketConfig(**kwargs))
