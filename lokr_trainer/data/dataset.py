"""Records → training samples: indexing (sizes, buckets), the map-style dataset, collation.

The pieces in one place::

    records = list(FolderSource("data/"))
    index = index_records(records, BucketSet.from_config(BucketConfig()), skip_log=log)
    ds = BucketDataset(index, Captioner(index.records, CaptionConfig(tag_dropout=0.1), seed=1), seed=1)
    sampler = BucketBatchSampler(index.bucket_ids, batch_size=4, seed=1, num_replicas=w, rank=r)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=4)
    for batch in loader:
        log.add_batch(batch)         # logs and counts images skipped inside workers
        if batch["size"] == 0: continue

A sample's crop and flip come from a generator seeded by ``(seed, epoch,
index)``, separate from the caption's, so a run is reproducible regardless
of worker count, prefetching or rank.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from lokr_trainer.data.buckets import Bucket, BucketSet, CropMode, CropPlan, plan_crop
from lokr_trainer.data.images import DecodeOptions, SkipLog, load_cropped, probe_size, to_tensor
from lokr_trainer.data.records import SampleRecord
from lokr_trainer.data.tags import Captioner
from lokr_trainer.errors import BadImageError, ConfigError, DataError

logger = logging.getLogger(__name__)

IMAGE_STREAM = 0x1A6


@dataclass
class IndexedRecords:
    """Records that passed the header check, with their displayed sizes and bucket ids."""

    records: list[SampleRecord]
    bucket_ids: np.ndarray
    bucket_set: BucketSet

    def __len__(self) -> int:
        return len(self.records)

    def bucket_of(self, i: int) -> Bucket:
        return self.bucket_set[int(self.bucket_ids[i])]


def probe_record_size(rec: SampleRecord, decode: DecodeOptions = DecodeOptions()) -> tuple[int, int]:
    """The displayed size from the image header; a tar member is probed in place (a few KiB read)."""
    if rec.data is None and rec.offset is not None:
        with rec.open_member() as fh:
            return probe_size(fh, rec.where, decode)
    src = rec.image_source()
    if src is None:
        raise BadImageError(rec.where, "record has neither a path nor data", kind="missing")
    return probe_size(src, rec.where, decode)


def index_records(
    records: Iterable[SampleRecord],
    bucket_set: BucketSet,
    decode: DecodeOptions = DecodeOptions(),
    skip_log: SkipLog | None = None,
    verify: bool = False,
    threads: int = 8,
    progress: bool = True,
) -> IndexedRecords:
    """Read each image's size from its header (unless metadata has it), drop bad ones, assign buckets.

    Bad files (empty, missing, not images, too large) are logged with their
    path and counted in ``skip_log``.  ``verify=True`` reads every header even
    when metadata gives a size (catches missing files and wrong sizes early).
    """
    from tqdm.auto import tqdm

    skip_log = skip_log if skip_log is not None else SkipLog()
    recs = list(records)

    def probe(rec: SampleRecord) -> tuple[int, int] | BadImageError:
        if rec.has_size() and not verify:
            return (int(rec.width), int(rec.height))  # type: ignore[arg-type]
        try:
            return probe_record_size(rec, decode)
        except BadImageError as e:
            return e

    kept: list[SampleRecord] = []
    sizes: list[tuple[int, int]] = []
    corrected: list[str] = []
    chunk = 4096  # bounded number of pending futures, even for millions of records
    with (
        ThreadPoolExecutor(max_workers=max(1, threads)) as pool,
        tqdm(total=len(recs), desc="reading image sizes", disable=not progress, unit="img") as bar,
    ):
        for start in range(0, len(recs), chunk):
            part = recs[start : start + chunk]
            for rec, res in zip(part, pool.map(probe, part)):
                if isinstance(res, BadImageError):
                    skip_log.add_error(res)
                    continue
                if rec.has_size() and _size_differs((int(rec.width), int(rec.height)), res):  # type: ignore[arg-type]
                    corrected.append(f"{rec.where} ({rec.width}x{rec.height} stated, {res[0]}x{res[1]} in the file)")
                rec.width, rec.height = res
                kept.append(rec)
                sizes.append(res)
            bar.update(len(part))
    if corrected:
        logger.warning(
            "%d images have a wrong size in their metadata; bucketed by the file's size: %s%s",
            len(corrected), "; ".join(corrected[:3]), " ..." if len(corrected) > 3 else "",
        )
    if not kept:
        raise DataError(f"no usable image among {len(recs)} records ({skip_log.summary()})")
    return IndexedRecords(kept, bucket_set.assign_many(sizes), bucket_set)


def _size_differs(stated: tuple[int, int], actual: tuple[int, int]) -> bool:
    """More than rounding apart: max(2 px, 1 %) per side (tools round sizes after resizing or rotating)."""
    return any(abs(a - s) > max(2, s // 100) for s, a in zip(stated, actual))


def _stated_size_holds(rec: SampleRecord, w: int, h: int) -> tuple[int, int]:
    """The file's size, once checked against the metadata size its bucket was chosen from.

    Sidecar sizes save a header read per image when indexing, so the check
    happens here, on the header the decode reads anyway: an image whose
    sidecar is wrong by more than rounding would be cropped hard into a bucket
    of the wrong shape, so it is skipped (kind ``wrong_size``, as the latent cache names it) and named.
    """
    sw, sh = rec.width, rec.height
    if sw and sh and _size_differs((sw, sh), (w, h)):
        raise BadImageError(
            rec.where, f"metadata says {sw}x{sh} but the image is {w}x{h}; fix the sidecar/manifest size or remove it",
            kind="wrong_size",
        )
    return w, h


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The crop/flip generator for one sample of one epoch."""
    return np.random.default_rng([int(seed), int(epoch), int(index), IMAGE_STREAM])


@dataclass(frozen=True)
class ImageConfig:
    """Per-sample image augmentation: crop placement and horizontal flip probability."""

    crop: CropMode = "center"
    flip_prob: float = 0.0
    decode: DecodeOptions = field(default_factory=DecodeOptions)

    def validate(self) -> None:
        if self.crop not in ("center", "random"):
            raise ConfigError(f"crop must be 'center' or 'random', got {self.crop!r}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ConfigError(f"flip_prob must be in [0, 1], got {self.flip_prob}")


class BucketDataset(torch.utils.data.Dataset):
    """Map-style dataset over indexed records; keys are ``(epoch, index)`` or a plain index (epoch 0).

    Returns a dict per sample (``pixel_values`` (3,H,W) in [-1, 1], ``caption``,
    ``time_ids`` (6,), ``key``, ``index``, ``flip``), or, for an image that
    fails to decode, ``{"skip": (where, reason, kind), "index": i}``, which
    :func:`collate` removes and reports.  With ``latent_cache`` set, samples
    carry ``latents`` (the cached VAE moments) instead of pixels when the cache
    has them.
    """

    def __init__(
        self,
        index: IndexedRecords,
        captioner: Captioner | None = None,
        image: ImageConfig = ImageConfig(),
        seed: int = 0,
        latent_cache: Any = None,
    ) -> None:
        image.validate()
        self.index = index
        self.captioner = captioner or Captioner(index.records, seed=seed)
        self.image = image
        self.seed = seed
        self.latent_cache = latent_cache
        if latent_cache is not None and image.crop == "random":
            raise ConfigError(
                "a latent cache needs crop='center': a random crop changes every epoch, so cached latents "
                "would never be reused (use random crops without the cache)"
            )

    def __len__(self) -> int:
        return len(self.index)

    def plan(self, index: int, epoch: int, orig_w: int, orig_h: int) -> CropPlan:
        rng = sample_rng(self.seed, epoch, index)
        flip = bool(self.image.flip_prob > 0 and rng.random() < self.image.flip_prob)
        return plan_crop(orig_w, orig_h, self.index.bucket_of(index), self.image.crop, rng, flip)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, int(key))
        rec = self.index.records[index]
        caption = self.captioner(rec, epoch, index)
        if self.latent_cache is not None:
            plan = self.plan(index, epoch, int(rec.width), int(rec.height))  # type: ignore[arg-type]
            try:
                moments = self.latent_cache.lookup(rec, plan)
            except BadImageError as e:
                return {"skip": (e.path or rec.where, e.reason, e.kind), "index": index}
            if moments is not None:
                return self._sample(rec, index, plan, caption, latents=moments)
        try:
            arr, plan = load_cropped(rec.image_source(), lambda w, h: self.plan(index, epoch, *_stated_size_holds(rec, w, h)),
                                     rec.where, self.image.decode)
        except BadImageError as e:
            logger.debug("skipping %s: %s", e.path or rec.where, e.reason)  # counted via SkipLog.add_batch
            return {"skip": (e.path or rec.where, e.reason, e.kind), "index": index}
        return self._sample(rec, index, plan, caption, pixels=to_tensor(arr))

    @staticmethod
    def _sample(
        rec: SampleRecord,
        index: int,
        plan: CropPlan,
        caption: str,
        pixels: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "caption": caption,
            "time_ids": torch.tensor(plan.time_ids(), dtype=torch.float32),
            "key": rec.key,
            "index": index,
            "flip": plan.flip,
            "plan": plan,
        }
        if pixels is not None:
            out["pixel_values"] = pixels
        if latents is not None:
            out["latents"] = latents
        return out


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a bucket's samples; skipped samples are removed and listed under ``skipped``.

    ``latents`` and ``pixel_values`` are stacked separately: ``latent_rows`` /
    ``pixel_rows`` give each one's positions in the batch (a partly built
    latent cache yields both; see
    ``lokr_trainer.train.encode.fill_missing_latents``).
    """
    good = [s for s in samples if "skip" not in s]
    out: dict[str, Any] = {
        "skipped": [s["skip"] for s in samples if "skip" in s],
        "size": len(good),
        "captions": [s["caption"] for s in good],
        "keys": [s["key"] for s in good],
        "indices": [s["index"] for s in good],
        "flips": [s["flip"] for s in good],
        "plans": [s["plan"] for s in good],
        "time_ids": torch.stack([s["time_ids"] for s in good]) if good else torch.zeros(0, 6),
    }
    pix = [i for i, s in enumerate(good) if "pixel_values" in s]
    lat = [i for i, s in enumerate(good) if "latents" in s]
    out["pixel_rows"], out["latent_rows"] = pix, lat
    out["pixel_values"] = torch.stack([good[i]["pixel_values"] for i in pix]) if pix else None
    out["latents"] = torch.stack([good[i]["latents"] for i in lat]) if lat else None
    return out
