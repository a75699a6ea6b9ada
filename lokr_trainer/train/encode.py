"""VAE / text-encoder encoding and the validated on-disk caches of their outputs.

(Model code, so it lives in ``train``; ``data`` only duck-types a latent
cache: any object with ``.lookup(record, plan)``.)

Why not kohya's ``<stem>_<W>x<H>_sdxl.npz``: its validity check is "file
exists and has the keys" (sd-scripts #1771), so a changed resolution, bucket
rule, VAE or caption silently reuses stale tensors.  Here every entry is a
``.safetensors`` file whose *name* is the SHA-256 of everything that
determines its content and whose metadata repeats those inputs plus a
checksum of the tensor bytes:

* latents: image content hash, bucket, resize, crop offsets, flip, VAE weights
  digest, dtype, format version;
* text-encoder outputs: the caption text, both encoders' weights digest,
  tokenizer ids, ``max_tokens``/layout, format version.

A lookup re-checks metadata, checksum and shape.  A changed input gives a
different name (a miss, built on the way); a damaged entry (truncated,
bit-flipped, unreadable or foreign file) is logged, deleted and rebuilt, never
reused.  An intact entry whose shape does not fit the model (latent size not
``bucket / scale_factor``, channels not ``2 × latent_channels``, hidden or
pooled width not the encoders') is a :class:`~lokr_trainer.errors.CacheError`
naming the file: the cache was built for another model or the cache object
was set up wrong, and rebuilding on every read would hide that.  Writes go to
a temporary file that is renamed into place, so an interrupted build leaves
only complete entries and resuming skips them.

Latent entries store the VAE's distribution *moments* (mean ‖ logvar,
unscaled) instead of one sample, so training can draw a fresh sample every
step with :func:`sample_latents` (multiply by the VAE scaling factor, 0.13025
for SDXL, afterwards) and the cache never bakes one noise draw into a run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from lokr_trainer.data.buckets import CropPlan
from lokr_trainer.data.images import SkipLog, load_cropped, to_tensor
from lokr_trainer.data.records import SampleRecord
from lokr_trainer.data.tags import CaptionConfig
from lokr_trainer.errors import BadImageError, CacheError, ConfigError
from lokr_trainer.safetensors_io import SafetensorsReader, save_tensors

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"
_HASH_CHUNK = 1 << 20
_warned_uncached = False  # fill_missing_latents warns once per process


# ----------------------------------------------------------------------------- helpers


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (any dtype, on any device)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def module_digest(*modules: torch.nn.Module) -> str:
    """Digest of the weights (names, dtypes, shapes, bytes) and configs of ``modules``.

    Reads every tensor once (about a second for the SDXL VAE); compute it once
    per run and pass it to the caches.  Config keys starting with ``_`` are
    library bookkeeping, not architecture, and are left out: diffusers'
    ``_use_default_values`` is a list made from a set, in an order that changes
    with each process's string-hash seed, so with it every process (every rank,
    every re-run) got its own digest and never reused another's cache entries.
    """
    h = hashlib.sha256()
    for m in modules:
        h.update(type(m).__name__.encode())
        cfg = getattr(m, "config", None)
        if cfg is not None:
            items = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
            items = {k: v for k, v in items.items() if not str(k).startswith("_")}
            h.update(json.dumps(items, sort_keys=True, default=str).encode())
        for name, t in sorted(m.state_dict().items()):
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            flat = t.detach().to("cpu").contiguous().reshape(-1)
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _entry_path(root: Path, key: str) -> Path:
    return root / key[:2] / f"{key}.safetensors"


def _read_entry(path: Path, expect: Mapping[str, str], names: Sequence[str]) -> dict[str, torch.Tensor] | None:
    """Load and validate one entry; ``None`` if absent, raise ``_Corrupt`` if unusable."""
    if not path.is_file():
        return None
    try:
        with SafetensorsReader(path) as f:
            meta = f.header.metadata
            tensors = {n: f.get(n) for n in names}
    except Exception as e:  # noqa: BLE001 - any read failure means a corrupt entry
        raise _Corrupt(f"unreadable ({type(e).__name__}: {e})") from None
    for k, v in expect.items():
        if meta.get(k) != v:
            raise _Corrupt(f"metadata {k}={meta.get(k)!r}, expected {v!r}")
    for n, t in tensors.items():
        if meta.get(f"sha256.{n}") != tensor_sha256(t):
            raise _Corrupt(f"checksum mismatch in {n!r}")
    return tensors


class _Corrupt(Exception):
    pass


@dataclass
class CacheStats:
    """What one process's cache lookups and builds did (merge across ranks for a summary)."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    built: int = 0
    skipped: int = 0

    def summary(self) -> str:
        return (
            f"cache: {self.hits} reused, {self.built} built, {self.corrupt} corrupt entries rebuilt, "
            f"{self.skipped} images skipped"
        )


class _EntryStore:
    """Shared lookup/store logic: content-addressed, validated, atomic."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.stats = CacheStats()

    def _load(self, key: str, expect: Mapping[str, str], names: Sequence[str]) -> dict[str, torch.Tensor] | None:
        path = _entry_path(self.root, key)
        try:
            out = _read_entry(path, expect, names)
        except _Corrupt as e:
            self.stats.corrupt += 1
            logger.warning("cache entry %s is corrupt (%s); it will be rebuilt", path, e)
            try:
                path.unlink()
            except OSError:
                pass
            return None
        if out is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
        return out

    def _store(self, key: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> Path:
        full = dict(meta)
        for n, t in tensors.items():
            full[f"sha256.{n}"] = tensor_sha256(t)
        path = _entry_path(self.root, key)
        # one small file per entry: no stale-temp scan of folders holding thousands of entries
        save_tensors(path, tensors, full, overwrite=True, clean_stale=False)
        self.stats.built += 1
        return path


def _key(fields: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(fields), sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- content hashes


class ContentHasher:
    """SHA-256 of image bytes, memoised by (path, size, mtime) so re-runs need not re-read files.

    The memo is saved next to the cache (one file per rank, merged on load);
    a file whose size or modification time changed is hashed again.
    """

    def __init__(self, memo_dir: str | os.PathLike | None = None, rank: int = 0) -> None:
        self.memo_dir = Path(memo_dir) if memo_dir is not None else None
        self.rank = rank
        self.memo: dict[str, tuple[int, int, str]] = {}
        self._dirty = False
        if self.memo_dir is not None and self.memo_dir.is_dir():
            for p in sorted(self.memo_dir.glob("content_hashes.*.json")):
                try:
                    self.memo.update({k: tuple(v) for k, v in json.loads(p.read_text()).items()})  # type: ignore[misc]
                except (OSError, ValueError):
                    logger.warning("ignoring unreadable hash memo %s", p)

    def __call__(self, rec: SampleRecord) -> str:
        if rec.data is not None:
            return hashlib.sha256(rec.data).hexdigest()
        if rec.path is None:
            raise BadImageError(rec.where, "record has neither a path nor data", kind="missing")
        try:
            st = os.stat(rec.path)
        except FileNotFoundError:
            raise BadImageError(rec.where, "file not found" if rec.offset is None else f"shard {rec.path} not found",
                                kind="missing") from None
        # a tar member is remembered by its place in the shard (the shard's size and mtime guard it)
        memo_key = rec.path if rec.offset is None else f"{rec.path}@{rec.offset}+{rec.size}"
        known = self.memo.get(memo_key)
        if known is not None and known[0] == st.st_size and known[1] == st.st_mtime_ns:
            return known[2]
        h = hashlib.sha256()
        with (open(rec.path, "rb") if rec.offset is None else rec.open_member()) as fh:
            while chunk := fh.read(_HASH_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        self.memo[memo_key] = (st.st_size, st.st_mtime_ns, digest)
        self._dirty = True
        return digest

    def save(self) -> None:
        if self.memo_dir is None or not self._dirty:
            return
        self.memo_dir.mkdir(parents=True, exist_ok=True)
        path = self.memo_dir / f"content_hashes.{self.rank}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.memo))
        os.replace(tmp, path)
        self._dirty = False


# ----------------------------------------------------------------------------- latents


def vae_scale_factor(vae: Any) -> int:
    """Pixel → latent downsampling of a diffusers ``AutoencoderKL`` (8 for SDXL)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_moments(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` in [-1, 1] → VAE moments ``(B, 2·C, H/f, W/f)`` (mean ‖ logvar)."""
    p = next(vae.parameters())
    return vae.encode(pixels.to(p.device, p.dtype)).latent_dist.parameters


def sample_latents(moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw from cached moments: ``mean + std · ε`` (unscaled, like ``latent_dist.sample()``)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(moments).sample(generator=generator)


class LatentCache(_EntryStore):
    """VAE latent moments per (image content, bucket, resize, crop, flip, VAE).

    Args:
        root: cache folder (entries under ``root/latents``).
        vae_digest: :func:`module_digest` of the VAE used (and its dtype's effect:
            include the encode dtype via ``encode_dtype``).
        scale_factor: pixel → latent downsampling (:func:`vae_scale_factor`).
        encode_dtype: dtype the VAE ran in (fp32 vs fp16 latents differ).
        rank: process rank, for the per-rank hash memo file.
        latent_channels: the VAE's ``config.latent_channels`` (entries hold
            twice that: mean ‖ logvar); ``None`` leaves the channels unchecked.

    An entry whose shape is not ``(2·latent_channels, H/f, W/f)`` for its
    bucket raises :class:`CacheError` (on lookup and on store).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        vae_digest: str,
        scale_factor: int = 8,
        encode_dtype: torch.dtype | str = "float32",
        rank: int = 0,
        latent_channels: int | None = None,
    ) -> None:
        super().__init__(Path(root) / "latents")
        self.vae_digest = vae_digest
        self.scale_factor = scale_factor
        self.encode_dtype = str(encode_dtype).replace("torch.", "")
        self.latent_channels = latent_channels
        self.hasher = ContentHasher(Path(root), rank)

    @classmethod
    def for_vae(cls, root: str | os.PathLike, vae: Any, rank: int = 0) -> "LatentCache":
        return cls(
            root,
            module_digest(vae),
            vae_scale_factor(vae),
            next(vae.parameters()).dtype,
            rank,
            latent_channels=int(vae.config.latent_channels),
        )

    def expected_shape(self, plan: CropPlan) -> tuple[int | None, int, int]:
        """``(channels or None, H, W)`` of this plan's moments; channels is ``None`` when unchecked."""
        ch = None if self.latent_channels is None else 2 * self.latent_channels
        return ch, plan.bucket.height // self.scale_factor, plan.bucket.width // self.scale_factor

    def _check_shape(self, m: torch.Tensor, plan: CropPlan, path: Path | str, stored: bool) -> None:
        want = self.expected_shape(plan)
        ok = m.ndim == 3 and tuple(m.shape[1:]) == want[1:] and (want[0] is None or m.shape[0] == want[0])
        if ok:
            return
        shown = "(" + ", ".join("*" if d is None else str(d) for d in want) + ")"
        what = (
            f"latent cache entry {path} has shape {tuple(m.shape)}"
            if stored
            else f"latents for {path} have shape {tuple(m.shape)}"
        )
        raise CacheError(
            f"{what}, but this cache expects {shown} for bucket "
            f"{plan.bucket.width}x{plan.bucket.height} (scale_factor={self.scale_factor}, "
            f"latent_channels={self.latent_channels}): the cache does not match this VAE. "
            "Either it was built with another VAE, or the LatentCache was given a wrong "
            "scale_factor/latent_channels (create it with LatentCache.for_vae(root, vae), or pass "
            f"scale_factor=vae_scale_factor(vae) and the VAE's config.latent_channels); "
            f"otherwise delete the cache folder {self.root.parent} and build it again"
        )

    def fields(self, content_hash: str, plan: CropPlan) -> dict[str, str]:
        return {
            "format": f"lokr_trainer.latents/{FORMAT_VERSION}",
            "content_sha256": content_hash,
            "bucket": f"{plan.bucket.width}x{plan.bucket.height}",
            "resized": f"{plan.resized_w}x{plan.resized_h}",
            "crop_left_top": f"{plan.left},{plan.top}",
            "flip": str(bool(plan.flip)),
            "vae_digest": self.vae_digest,
            "encode_dtype": self.encode_dtype,
        }

    def key_for(self, rec: SampleRecord, plan: CropPlan) -> tuple[str, dict[str, str]]:
        f = self.fields(self.hasher(rec), plan)
        return _key(f), f

    def lookup(self, rec: SampleRecord, plan: CropPlan) -> torch.Tensor | None:
        """Cached moments for this sample, or ``None`` (absent, or corrupt and deleted → rebuilt by the caller).

        Raises:
            CacheError: the entry is intact but its shape does not fit this VAE / bucket.
        """
        key, f = self.key_for(rec, plan)
        out = self._load(key, f, ["moments"])
        if out is None:
            return None
        m = out["moments"]
        try:
            self._check_shape(m, plan, _entry_path(self.root, key), stored=True)
        except CacheError:
            self.stats.hits -= 1
            raise
        return m

    def store(self, rec: SampleRecord, plan: CropPlan, moments: torch.Tensor) -> Path:
        """Write one entry; moments that do not fit this cache's VAE settings raise :class:`CacheError`."""
        key, f = self.key_for(rec, plan)
        self._check_shape(moments, plan, rec.where, stored=False)
        return self._store(key, {"moments": moments}, f)


@dataclass
class CacheReport:
    """Result of one cache build on one rank."""

    total: int = 0
    reused: int = 0
    built: int = 0
    corrupt_rebuilt: int = 0
    skipped: int = 0
    skipped_paths: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.total} entries: {self.reused} reused, {self.built} built "
            f"({self.corrupt_rebuilt} were corrupt), {self.skipped} images skipped"
        )


class _DecodeJobs(torch.utils.data.Dataset):
    """Decodes the images of pending cache entries (so DataLoader workers can do it in parallel)."""

    def __init__(self, dataset: Any, jobs: Sequence[tuple[int, CropPlan]]) -> None:
        self.dataset, self.jobs = dataset, list(jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, j: int) -> dict[str, Any]:
        i, plan = self.jobs[j]
        rec = self.dataset.index.records[i]
        def same_size(w: int, h: int) -> CropPlan:
            if (w, h) != (plan.orig_w, plan.orig_h):
                raise BadImageError(
                    rec.where,
                    f"the file is {w}x{h} but its metadata says {plan.orig_w}x{plan.orig_h}; "
                    "fix the metadata or index with verify=True",
                    kind="wrong_size",
                )
            return plan

        try:
            arr, _ = load_cropped(rec.image_source(), same_size, rec.where, self.dataset.image.decode)
        except BadImageError as e:
            return {"job": j, "skip": (e.path or rec.where, e.reason, e.kind)}
        return {"job": j, "pixels": to_tensor(arr)}


def _collate_jobs(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def build_latent_cache(
    dataset: Any,
    vae: Any,
    cache: LatentCache,
    *,
    batch_size: int = 4,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    skip_log: SkipLog | None = None,
    progress: bool = True,
) -> CacheReport:
    """Encode every (sample, flip variant) of this rank's share that the cache lacks.

    ``dataset`` is a :class:`~lokr_trainer.data.dataset.BucketDataset` with
    ``crop="center"``; rank ``r`` of ``w`` takes samples ``r, r+w, …`` (call
    it on every rank, then wait for all before training).  Flip variants are
    both cached when ``flip_prob`` is strictly between 0 and 1.  Valid entries
    are reused, so an interrupted build resumes where it stopped.
    """
    from tqdm.auto import tqdm

    if dataset.image.crop != "center":
        raise ConfigError("latent caching needs crop='center' (random crops change every epoch)")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, {world_size})")
    skip_log = skip_log if skip_log is not None else SkipLog()
    fp = dataset.image.flip_prob
    flips = [False, True] if 0 < fp < 1 else [fp >= 1]
    report = CacheReport()
    pending: dict[Any, list[tuple[int, CropPlan]]] = defaultdict(list)
    corrupt_before = cache.stats.corrupt
    mine = range(rank, len(dataset), world_size)
    for i in tqdm(mine, desc=f"checking latent cache (rank {rank})", disable=not progress, unit="img"):
        rec = dataset.index.records[i]
        for flip in flips:
            report.total += 1
            plan = dataset.plan(i, 0, int(rec.width), int(rec.height))
            plan = CropPlan(
                plan.orig_w, plan.orig_h, plan.bucket, plan.resized_w, plan.resized_h, plan.left, plan.top, flip
            )
            try:
                hit = cache.lookup(rec, plan)
            except BadImageError as e:
                skip_log.add_error(e)
                report.skipped += 1
                continue
            if hit is not None:
                report.reused += 1
            else:
                pending[plan.bucket].append((i, plan))
    report.corrupt_rebuilt = cache.stats.corrupt - corrupt_before
    jobs = [j for b in sorted(pending) for j in pending[b]]
    # batch only within a bucket: one VAE call per batch of equal-size images
    batches: list[list[int]] = []
    start = 0
    for b in sorted(pending):
        n = len(pending[b])
        batches += [list(range(start + k, min(start + n, start + k + batch_size))) for k in range(0, n, batch_size)]
        start += n
    loader = torch.utils.data.DataLoader(
        _DecodeJobs(dataset, jobs), batch_sampler=batches, num_workers=num_workers, collate_fn=_collate_jobs
    )
    bar = tqdm(total=len(jobs), desc=f"encoding latents (rank {rank})", disable=not progress, unit="img")
    try:
        for items in loader:
            good = [it for it in items if "pixels" in it]
            for it in items:
                if "skip" in it:
                    where, reason, kind = it["skip"]
                    skip_log.add(where, reason, kind)
                    report.skipped += 1
            if good:
                moments = encode_moments(vae, torch.stack([it["pixels"] for it in good]))
                for it, m in zip(good, moments):
                    i, plan = jobs[it["job"]]
                    cache.store(dataset.index.records[i], plan, m)
                    report.built += 1
            bar.update(len(items))
    finally:
        bar.close()
        cache.hasher.save()
    report.skipped_paths = [p for ex in skip_log.examples.values() for p in ex]
    logger.info("latent cache (rank %d): %s", rank, report.summary())
    return report


def fill_missing_latents(
    batch: dict[str, Any], vae: Any, dataset: Any = None, cache: LatentCache | None = None
) -> torch.Tensor:
    """All of a batch's latent moments in batch order, encoding rows that came as pixels.

    With ``cache`` and ``dataset`` given, freshly encoded rows are stored, so a
    partly built cache fills itself during the first epoch (an image added
    after the build, say).  The first time a batch brings pixels while a cache
    is given, a warning says how many rows were not cached (once per process).
    """
    global _warned_uncached
    n = batch["size"]
    if n == 0:
        raise CacheError("empty batch: every image in it was skipped")
    parts: dict[int, torch.Tensor] = {}
    if batch["latents"] is not None:
        for row, m in zip(batch["latent_rows"], batch["latents"]):
            parts[row] = m
    if batch["pixel_values"] is not None:
        if cache is not None and not _warned_uncached:
            _warned_uncached = True
            logger.warning(
                "%d of %d rows of a batch are not in the latent cache %s; encoding them with the VAE "
                "in the training loop%s (build the cache beforehand with build_latent_cache; "
                "this warning is shown once)",
                len(batch["pixel_rows"]),
                n,
                cache.root,
                " and storing them" if dataset is not None else "",
            )
        enc = encode_moments(vae, batch["pixel_values"])
        for row, m in zip(batch["pixel_rows"], enc):
            parts[row] = m
            if cache is not None and dataset is not None:
                rec = dataset.index.records[batch["indices"][row]]
                cache.store(rec, batch["plans"][row], m)
    ref = next(vae.parameters())
    return torch.stack([parts[r].to(ref.device, ref.dtype) for r in range(n)])


# ----------------------------------------------------------------------------- text-encoder outputs


def check_te_cache_allowed(caption: CaptionConfig, train_text_encoders: bool) -> None:
    """Refuse a text-encoder cache whose entries would be wrong for this run (clear reason)."""
    if train_text_encoders:
        raise ConfigError(
            "text-encoder outputs cannot be cached while the text encoders are trained (TE adapters on): "
            "their outputs change every step; disable TE training or the TE cache"
        )
    if not caption.is_fixed:
        bad = [
            f"{name}={getattr(caption, name)}"
            for name in ("shuffle_general", "tag_dropout", "group_dropout", "caption_dropout")
            if getattr(caption, name)
        ]
        raise ConfigError(
            "text-encoder outputs can only be cached when every caption is fixed, but "
            + ", ".join(bad)
            + " changes captions every step; set them to off/0 or disable the TE cache"
        )


def tokenizer_fingerprint(*tokenizers: Any) -> str:
    """What about a tokenizer changes the ids: class, vocabulary size, special ids."""
    parts = [f"{type(t).__name__}:{len(t)}:{t.bos_token_id}:{t.eos_token_id}:{t.pad_token_id}" for t in tokenizers]
    return "|".join(parts)


def _config_int(module: Any, name: str) -> int | None:
    value = getattr(getattr(module, "config", None), name, None)
    return None if value is None else int(value)


class TextEncoderCache(_EntryStore):
    """Text-encoder outputs (``hidden`` (L, D), ``pooled`` (P)) per caption.

    ``te_digest`` covers both encoders' weights and the tokenizers
    (:meth:`for_encoder` computes it); ``settings`` are the prompt encoder's
    ``max_tokens``/layout.  ``hidden_dim`` (D: TE1 + TE2 hidden sizes, 2048
    for SDXL) and ``pooled_dim`` (P: TE2's projection, 1280), when given, are
    checked on lookup and store: an entry of another width is a :class:`CacheError`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        te_digest: str,
        settings: Mapping[str, Any],
        hidden_dim: int | None = None,
        pooled_dim: int | None = None,
    ) -> None:
        super().__init__(Path(root) / "text")
        self.te_digest = te_digest
        self.settings = json.dumps(dict(settings), sort_keys=True)
        self.hidden_dim = hidden_dim
        self.pooled_dim = pooled_dim

    @classmethod
    def for_encoder(cls, root: str | os.PathLike, encoder: Any) -> "TextEncoderCache":
        digest = module_digest(encoder.text_encoder, encoder.text_encoder_2)
        digest = hashlib.sha256(
            (digest + tokenizer_fingerprint(encoder.tokenizer, encoder.tokenizer_2)).encode()
        ).hexdigest()
        h1 = _config_int(encoder.text_encoder, "hidden_size")
        h2 = _config_int(encoder.text_encoder_2, "hidden_size")
        hidden = None if h1 is None or h2 is None else h1 + h2
        return cls(root, digest, encoder.settings, hidden, _config_int(encoder.text_encoder_2, "projection_dim"))

    def _check_shape(self, hidden: torch.Tensor, pooled: torch.Tensor, what: str) -> None:
        bad = []
        if hidden.ndim != 2 or (self.hidden_dim is not None and hidden.shape[-1] != self.hidden_dim):
            bad.append(f"hidden {tuple(hidden.shape)}, expected (L, {self.hidden_dim or '*'})")
        if pooled.ndim != 1 or (self.pooled_dim is not None and pooled.shape[0] != self.pooled_dim):
            bad.append(f"pooled {tuple(pooled.shape)}, expected ({self.pooled_dim or '*'},)")
        if bad:
            raise CacheError(
                f"{what} has " + " and ".join(bad) + ": the cache does not match these text encoders. "
                "Either it was built with other encoders, or the TextEncoderCache was given a wrong "
                "hidden_dim/pooled_dim (create it with TextEncoderCache.for_encoder(root, encoder): "
                "hidden = TE1 + TE2 hidden_size, pooled = TE2 projection_dim); otherwise delete the "
                f"cache folder {self.root.parent} and build it again"
            )

    def fields(self, caption: str) -> dict[str, str]:
        return {
            "format": f"lokr_trainer.text/{FORMAT_VERSION}",
            "caption_sha256": hashlib.sha256(caption.encode("utf-8")).hexdigest(),
            "te_digest": self.te_digest,
            "settings": self.settings,
        }

    def lookup(self, caption: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cached ``(hidden, pooled)``, or ``None`` (absent, or corrupt and deleted).

        Raises:
            CacheError: the entry is intact but its widths do not fit these encoders.
        """
        f = self.fields(caption)
        key = _key(f)
        out = self._load(key, f, ["hidden", "pooled"])
        if out is None:
            return None
        try:
            self._check_shape(out["hidden"], out["pooled"], f"text cache entry {_entry_path(self.root, key)}")
        except CacheError:
            self.stats.hits -= 1
            raise
        return out["hidden"], out["pooled"]

    def store(self, caption: str, hidden: torch.Tensor, pooled: torch.Tensor) -> Path:
        self._check_shape(hidden, pooled, f"the encoding of caption {caption[:60]!r}")
        f = self.fields(caption)
        return self._store(_key(f), {"hidden": hidden, "pooled": pooled}, f)


def build_text_cache(
    captions: Iterable[str],
    encoder: Any,
    cache: TextEncoderCache,
    *,
    batch_size: int = 16,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> CacheReport:
    """Encode this rank's share of the distinct ``captions`` that the cache lacks (resumable)."""
    from tqdm.auto import tqdm

    unique = sorted(set(captions))
    mine = unique[rank::world_size]
    report = CacheReport(total=len(mine))
    corrupt_before = cache.stats.corrupt
    todo = []
    for c in tqdm(mine, desc=f"checking text cache (rank {rank})", disable=not progress, unit="caption"):
        if cache.lookup(c) is None:
            todo.append(c)
        else:
            report.reused += 1
    report.corrupt_rebuilt = cache.stats.corrupt - corrupt_before
    with tqdm(total=len(todo), desc=f"encoding captions (rank {rank})", disable=not progress, unit="caption") as bar:
        for k in range(0, len(todo), batch_size):
            chunk = todo[k : k + batch_size]
            with torch.no_grad():
                out = encoder(chunk)
            for c, h, p in zip(chunk, out.hidden, out.pooled):
                cache.store(c, h, p)
                report.built += 1
            bar.update(len(chunk))
    logger.info("text cache (rank %d): %s", rank, report.summary())
    return report


def cached_text_batch(
    captions: Sequence[str], cache: TextEncoderCache, encoder: Callable[[Sequence[str]], Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack cached ``(hidden, pooled)`` for a batch; misses are encoded (and stored) when ``encoder`` is given."""
    rows: list[tuple[torch.Tensor, torch.Tensor] | None] = [cache.lookup(c) for c in captions]
    missing = [i for i, r in enumerate(rows) if r is None]
    if missing:
        if encoder is None:
            raise CacheError(
                f"{len(missing)} caption(s) are not in the text-encoder cache (first: {captions[missing[0]]!r}); "
                "build it with build_text_cache before training"
            )
        with torch.no_grad():
            out = encoder([captions[i] for i in missing])
        for i, h, p in zip(missing, out.hidden, out.pooled):
            cache.store(captions[i], h, p)
            rows[i] = (h, p)
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])  # type: ignore[index]
