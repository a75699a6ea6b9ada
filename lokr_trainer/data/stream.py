"""Streaming bucketed batches from tar shards (data that does not fit one disk).

Shards cannot be indexed up front, so bucketing happens on the fly: each
decoded sample goes to its bucket's buffer and a batch is emitted as soon as a
buffer holds ``batch_size`` samples (one bucket per batch, as with the map-style
sampler).  Shards are dealt to ranks (``rank::world``) and then to DataLoader
workers; the shard order is shuffled per epoch from ``(seed, epoch)``.  Per
sample randomness (caption, crop, flip) is seeded by ``(seed, epoch, key
hash)``, so it does not depend on worker count or timing.

Ranks see different shards, so their batch counts can differ; give every rank
the same number of similar-sized shards and set ``max_batches`` (the same on
all ranks) to stop them together.  Quality tags need dataset-wide
percentiles: compute them once (``python -m lokr_trainer.data --json``) and
pass ``QualityThresholds`` in the ``Captioner``.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any, Iterator

import numpy as np
import torch

from lokr_trainer.data.buckets import BucketSet, plan_crop
from lokr_trainer.data.dataset import BucketDataset, ImageConfig, collate, sample_rng
from lokr_trainer.data.images import load_cropped, to_tensor
from lokr_trainer.data.sources import WebDatasetSource
from lokr_trainer.data.tags import Captioner
from lokr_trainer.errors import BadImageError, ConfigError

SHARD_STREAM = 0x5D0


def key_index(key: str) -> int:
    """A stable non-negative integer for a sample key (seeds its per-sample generators)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little") >> 1


class ShardBucketStream(torch.utils.data.IterableDataset):
    """Yields collated batches (see :func:`lokr_trainer.data.dataset.collate`); use ``DataLoader(batch_size=None)``."""

    def __init__(
        self,
        source: WebDatasetSource,
        bucket_set: BucketSet,
        captioner: Captioner,
        batch_size: int,
        image: ImageConfig = ImageConfig(),
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        max_batches: int | None = None,
    ) -> None:
        image.validate()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, {world_size})")
        if len(source.shards) < world_size:
            raise ConfigError(f"{len(source.shards)} shard(s) cannot feed {world_size} ranks; split the data finer")
        self.source, self.bucket_set, self.captioner = source, bucket_set, captioner
        self.batch_size, self.image, self.seed = batch_size, image, seed
        self.rank, self.world_size = rank, world_size
        self.drop_last, self.max_batches = drop_last, max_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (takes effect for iterators created afterwards; avoid persistent workers)."""
        self.epoch = int(epoch)

    def shards_for(self, worker: int = 0, num_workers: int = 1) -> list[str]:
        mine = self.source.shard_range(self.rank, self.world_size)
        order = np.random.default_rng([int(self.seed), self.epoch, SHARD_STREAM]).permutation(len(mine))
        return [mine[i] for i in order][worker::num_workers]

    def _sample(self, rec: Any) -> dict[str, Any]:
        idx = key_index(rec.key)
        rng = sample_rng(self.seed, self.epoch, idx)
        flip = bool(self.image.flip_prob > 0 and rng.random() < self.image.flip_prob)

        def plan_for(w: int, h: int):
            return plan_crop(w, h, self.bucket_set[self.bucket_set.assign(w, h)], self.image.crop, rng, flip)

        try:
            arr, plan = load_cropped(rec.image_source(), plan_for, rec.where, self.image.decode)
        except BadImageError as e:
            return {"skip": (rec.where, e.reason, e.kind), "index": idx}
        out = BucketDataset._sample(rec, idx, plan, self.captioner(rec, self.epoch, idx), pixels=to_tensor(arr))
        out["bucket"] = plan.bucket
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        buffers: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        skipped: list[dict[str, Any]] = []
        emitted = 0
        bad_before = len(self.source.bad_shards)
        limit = None if self.max_batches is None else self.max_batches // nw + (wid < self.max_batches % nw)
        for rec in self.source.iter_shards(self.shards_for(wid, nw)):
            s = self._sample(rec)
            if "skip" in s:
                skipped.append(s)
                continue
            buf = buffers[s.pop("bucket")]
            buf.append(s)
            if len(buf) == self.batch_size:
                yield collate(skipped + buf)
                buf.clear()
                skipped = []
                emitted += 1
                if limit is not None and emitted >= limit:
                    return
        for b in sorted(buffers):
            if buffers[b] and not self.drop_last:
                if limit is not None and emitted >= limit:
                    return
                yield collate(skipped + buffers[b])
                skipped = []
                emitted += 1
        for url in self.source.bad_shards[bad_before:]:
            skipped.append({"skip": (url, "unreadable tar shard (rest of it skipped)", "bad_shard"), "index": -1})
        if skipped:
            yield collate(skipped)  # an empty batch that still reports its skips
