"""Global batches → per-rank micro-batches, so a run depends on the global batch only.

DESIGN.md §6: (2 processes × accumulation 1), (1 process × accumulation 2)
and (1 process × batch 2b) must train the same weights.  So the unit of
sampling is the *optimizer step*: for epoch ``e`` the step list is
:class:`~lokr_trainer.data.sampler.BucketBatchSampler`'s global batches of
``global_batch`` samples (one bucket per step, order fixed by ``(seed, e)``),
and each step's samples are cut into ``processes × accumulation``
micro-batches of ``batch_size``: micro-step ``m`` of rank ``r`` takes positions
``[(m·P + r)·b, (m·P + r + 1)·b)`` of the step's list.  Every sample carries a
weight; a bucket's last, short step is padded to ``global_batch`` with
zero-weight repeats (so every rank runs the same number of passes and DDP
never waits for a missing one), and the step's loss divides by the number of
real samples, whatever the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from lokr_trainer.data.dataset import collate
from lokr_trainer.data.sampler import BucketBatchSampler
from lokr_trainer.errors import ConfigError, DataError

#: A sample key as the training DataLoader sees it: (epoch, dataset index, weight).
SampleKey = tuple[int, int, float]


@dataclass(frozen=True)
class Layout:
    """How one global batch is split: per-device batch × accumulation × processes."""

    batch_size: int
    grad_accum: int
    num_processes: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.num_processes


@dataclass(frozen=True)
class StepSamples:
    """The samples of one optimizer step: indices padded to the global batch, 0/1 weights."""

    epoch: int
    step_in_epoch: int
    indices: tuple[int, ...]
    weights: tuple[float, ...]

    @property
    def n_real(self) -> int:
        return int(sum(w > 0 for w in self.weights))


class GlobalBatchPlan:
    """The deterministic list of optimizer steps of every epoch (same on every rank)."""

    def __init__(
        self, bucket_ids: Sequence[int] | np.ndarray, global_batch: int, seed: int, drop_incomplete: bool = False
    ) -> None:
        if global_batch < 1:
            raise ConfigError(f"the global batch must be >= 1, got {global_batch}")
        self.global_batch = int(global_batch)
        self._sampler = BucketBatchSampler(
            bucket_ids, batch_size=self.global_batch, seed=seed, num_replicas=1, drop_last=drop_incomplete
        )
        self._epoch: int | None = None
        self._batches: list[list[int]] = []
        self.steps_per_epoch = len(self._sampler.global_batches(0))
        if self.steps_per_epoch == 0:
            raise DataError(
                f"no optimizer step fits: every bucket has fewer than global_batch={global_batch} images and "
                "data.drop_incomplete is on; lower the global batch or turn drop_incomplete off"
            )

    def step(self, epoch: int, step_in_epoch: int) -> StepSamples:
        if self._epoch != epoch:
            self._batches = self._sampler.global_batches(epoch)
            self._epoch = epoch
        batch = self._batches[step_in_epoch]
        n = len(batch)
        pad = [batch[i % n] for i in range(self.global_batch - n)]
        return StepSamples(epoch, step_in_epoch, tuple(batch + pad), (1.0,) * n + (0.0,) * len(pad))

    def micro_batches(self, step: StepSamples, layout: Layout, rank: int) -> list[list[SampleKey]]:
        """This rank's ``grad_accum`` micro-batches of one step, in micro-step order."""
        if layout.global_batch != self.global_batch:
            raise ConfigError(f"layout gives a global batch of {layout.global_batch}, the plan has {self.global_batch}")
        b, p = layout.batch_size, layout.num_processes
        out = []
        for m in range(layout.grad_accum):
            start = (m * p + rank) * b
            out.append(
                [(step.epoch, step.indices[i], step.weights[i]) for i in range(start, start + b)]
            )
        return out


class MicroBatchSampler:
    """``DataLoader(batch_sampler=...)`` for one rank: micro-batches from ``start_step`` to ``total_steps``.

    Steps are numbered globally (``epoch = step // steps_per_epoch``), so a
    resumed run picks up at the exact micro-batch where it stopped, mid-epoch
    or not, without replaying the ones before it.
    """

    def __init__(self, plan: GlobalBatchPlan, layout: Layout, rank: int, start_step: int, total_steps: int) -> None:
        self.plan, self.layout, self.rank = plan, layout, rank
        self.start_step, self.total_steps = int(start_step), int(total_steps)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        spe = self.plan.steps_per_epoch
        for step in range(self.start_step, self.total_steps):
            samples = self.plan.step(step // spe, step % spe)
            yield from self.plan.micro_batches(samples, self.layout, self.rank)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.layout.grad_accum


class WeightedSamples(torch.utils.data.Dataset):
    """Wraps a :class:`~lokr_trainer.data.dataset.BucketDataset` so keys carry a sample weight."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        epoch, index, weight = key
        sample = self.dataset[(int(epoch), int(index))]
        sample["weight"] = float(weight)
        sample["epoch"] = int(epoch)
        return sample


def collate_weighted(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`~lokr_trainer.data.dataset.collate` plus ``weights`` and ``epochs`` of the kept samples."""
    out = collate(samples)
    kept = [s for s in samples if "skip" not in s]
    out["weights"] = torch.tensor([s["weight"] for s in kept], dtype=torch.float32)
    out["epochs"] = [s["epoch"] for s in kept]
    return out
