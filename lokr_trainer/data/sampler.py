"""Bucket batch sampler: one bucket per batch, batches dealt evenly to ranks, deterministic.

For epoch ``e`` and seed ``s`` the global batch list is fixed: indices are
shuffled within each bucket, cut into batches of ``batch_size`` (a bucket's
remainder becomes one short batch unless ``drop_last``), and the batch list is
shuffled, all with a generator seeded by ``(s, e)``.  Rank ``r`` of ``w`` takes
batches ``r, r+w, r+2w, …``; the list is first padded (by repeating batches
from its start) or, with ``drop_last``, truncated to a multiple of ``w``, so
every rank runs the same number of steps (DDP would hang otherwise).  Each
yielded batch is a list of ``(epoch, index)`` keys so that map-style datasets
can draw per-sample randomness for the right epoch even in persistent
DataLoader workers.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from lokr_trainer.errors import ConfigError

SAMPLER_STREAM = 0x5A3


class BucketBatchSampler:
    """Yields lists of ``(epoch, index)``; use as ``DataLoader(batch_sampler=...)``.

    Args:
        bucket_ids: bucket id of every sample (``len == dataset size``).
        batch_size: per-rank batch size.
        seed: base seed; the order depends only on ``seed`` and the epoch.
        num_replicas, rank: data-parallel world size and this process's rank.
        drop_last: drop short bucket remainders and trailing batches that do
            not fill all ranks, instead of padding.
        shuffle: shuffle indices and batches (``False``: bucket order, index order).
    """

    def __init__(
        self,
        bucket_ids: Sequence[int] | np.ndarray,
        batch_size: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ConfigError(f"rank {rank} is not in [0, {num_replicas})")
        self.bucket_ids = np.asarray(bucket_ids, dtype=np.int64)
        if len(self.bucket_ids) == 0:
            raise ConfigError("the dataset is empty: no sample to sample from")
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0
        self._members = {int(b): np.flatnonzero(self.bucket_ids == b) for b in np.unique(self.bucket_ids)}

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (call before each epoch, like ``DistributedSampler``); resets the start position."""
        self.epoch = int(epoch)
        self.start_batch = 0

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches of an epoch, before they are dealt to ranks (same on every rank)."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([int(self.seed), int(epoch), SAMPLER_STREAM])
        batches: list[list[int]] = []
        for b in sorted(self._members):
            idx = self._members[b]
            if self.shuffle:
                idx = idx[rng.permutation(len(idx))]
            for i in range(0, len(idx), self.batch_size):
                chunk = idx[i : i + self.batch_size]
                if len(chunk) < self.batch_size and self.drop_last:
                    continue
                batches.append([int(x) for x in chunk])
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        w = self.num_replicas
        if len(batches) % w:
            if self.drop_last or not batches:
                batches = batches[: len(batches) - len(batches) % w]
            else:
                pad = w - len(batches) % w
                batches = batches + [batches[i % len(batches)] for i in range(pad)]
        return batches

    def rank_batches(self, epoch: int | None = None) -> list[list[int]]:
        return self.global_batches(epoch)[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        e = self.epoch
        for batch in self.rank_batches(e)[self.start_batch :]:
            yield [(e, i) for i in batch]

    def __len__(self) -> int:
        """Batches left in the current epoch on this rank (the same count every epoch)."""
        return max(0, len(self.rank_batches(self.epoch)) - self.start_batch)

    # Resume support: the training loop stores this with its checkpoint.
    def state_dict(self, batches_done: int) -> dict[str, int]:
        """Position after ``batches_done`` batches of the current epoch."""
        return {"epoch": self.epoch, "start_batch": int(batches_done), "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ConfigError(
                f"sampler state was saved with seed {state['seed']}, this run uses {self.seed}; resuming would "
                "replay a different data order"
            )
        self.epoch = int(state["epoch"])
        self.start_batch = int(state["start_batch"])
