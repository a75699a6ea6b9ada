"""Bucket batch sampler: one bucket per batch, even split over ranks, deterministic per seed and epoch."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from lokr_trainer.data.sampler import BucketBatchSampler
from lokr_trainer.errors import ConfigError


def bucket_ids(n: int = 1000, buckets: int = 13, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(buckets) * 0.5)  # very uneven bucket sizes, like real data
    return rng.choice(buckets, size=n, p=p)


def all_rank_batches(ids, world: int, epoch: int = 0, **kw) -> list[list[list[tuple[int, int]]]]:
    out = []
    for r in range(world):
        s = BucketBatchSampler(ids, num_replicas=world, rank=r, **kw)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_one_bucket_per_batch_and_every_sample_once(world: int) -> None:
    ids = bucket_ids()
    per_rank = all_rank_batches(ids, world, epoch=3, batch_size=4, seed=11)
    lengths = {len(b) for b in per_rank}
    assert len(lengths) == 1  # every rank runs the same number of steps
    seen: Counter[int] = Counter()
    for batches in per_rank:
        for batch in batches:
            assert 1 <= len(batch) <= 4
            assert {e for e, _ in batch} == {3}
            assert len({int(ids[i]) for _, i in batch}) == 1
            seen.update(i for _, i in batch)
    assert set(seen) == set(range(len(ids)))
    pad = sum(seen.values()) - len(ids)
    assert 0 <= pad and max(seen.values()) <= 2
    # padding only repeats whole batches to fill the last round: fewer than `world` batches
    assert pad <= (world - 1) * 4


def test_buckets_spread_evenly_over_ranks() -> None:
    ids = bucket_ids(4000, buckets=6, seed=1)
    per_rank = all_rank_batches(ids, 4, batch_size=4, seed=0)
    totals = Counter(int(ids[i]) for batches in per_rank for b in batches for _, i in b)
    for batches in per_rank:
        share = Counter(int(ids[i]) for b in batches for _, i in b)
        for bucket, total in totals.items():
            if total >= 200:  # well-populated buckets: each rank gets about a quarter
                assert abs(share[bucket] / total - 0.25) < 0.08, (bucket, share[bucket], total)


def test_deterministic_for_seed_and_epoch() -> None:
    ids = bucket_ids()
    a = all_rank_batches(ids, 2, epoch=1, batch_size=4, seed=5)
    b = all_rank_batches(ids, 2, epoch=1, batch_size=4, seed=5)
    assert a == b
    assert a != all_rank_batches(ids, 2, epoch=2, batch_size=4, seed=5)
    assert a != all_rank_batches(ids, 2, epoch=1, batch_size=4, seed=6)
    # the global order does not depend on the world size (ranks deal from one list)
    s1 = BucketBatchSampler(ids, 4, seed=5)
    s2 = BucketBatchSampler(ids, 4, seed=5, num_replicas=2, rank=1)
    s1.set_epoch(1)
    s2.set_epoch(1)
    g1, g2 = s1.global_batches(), s2.global_batches()
    assert g2[: len(g1)] == g1 and len(g2) - len(g1) < 2  # world 2 only pads the end


def test_drop_last_gives_full_batches_only() -> None:
    ids = bucket_ids()
    per_rank = all_rank_batches(ids, 3, batch_size=8, seed=0, drop_last=True)
    assert len({len(b) for b in per_rank}) == 1
    flat = [i for batches in per_rank for b in batches for _, i in b]
    assert all(len(b) == 8 for batches in per_rank for b in batches)
    assert len(flat) == len(set(flat))  # no padding repeats


def test_no_shuffle_is_bucket_then_index_order() -> None:
    ids = np.array([1, 0, 1, 0, 0])
    s = BucketBatchSampler(ids, batch_size=2, shuffle=False)
    assert [[i for _, i in b] for b in s] == [[1, 3], [4], [0, 2]]


def test_resume_position() -> None:
    ids = bucket_ids()
    s = BucketBatchSampler(ids, 4, seed=9)
    s.set_epoch(2)
    full = list(s)
    state = s.state_dict(batches_done=10)
    t = BucketBatchSampler(ids, 4, seed=9)
    t.load_state_dict(state)
    assert list(t) == full[10:] and len(t) == len(full) - 10
    with pytest.raises(ConfigError, match="seed"):
        BucketBatchSampler(ids, 4, seed=1).load_state_dict(state)


@pytest.mark.parametrize("kw", [dict(batch_size=0), dict(rank=2, num_replicas=2), dict(num_replicas=0)])
def test_bad_arguments(kw) -> None:
    args = {"bucket_ids": [0, 1], "batch_size": 2, **kw}
    with pytest.raises(ConfigError):
        BucketBatchSampler(**args)
    with pytest.raises(ConfigError, match="empty"):
        BucketBatchSampler([], 2)
