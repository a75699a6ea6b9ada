"""Encoding and the latent / text-encoder caches: hits equal fresh encodes; changed inputs and corrupt
entries rebuild; entries that do not fit the model are a CacheError; ``data`` stays free of model code."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lokr_trainer.data.buckets import BucketConfig, BucketSet, CropPlan
from lokr_trainer.data.dataset import BucketDataset, ImageConfig, collate, index_records
from lokr_trainer.data.images import load_cropped, to_tensor
from lokr_trainer.data.sampler import BucketBatchSampler
from lokr_trainer.data.sources import FolderSource
from lokr_trainer.data.tags import CaptionConfig, Captioner
from lokr_trainer.errors import CacheError, ConfigError
from lokr_trainer.train import encode
from lokr_trainer.train.encode import (
    LatentCache,
    TextEncoderCache,
    build_latent_cache,
    build_text_cache,
    cached_text_batch,
    check_te_cache_allowed,
    encode_moments,
    fill_missing_latents,
    sample_latents,
)
from lokr_trainer.train.prompts import PromptEncoder

SMALL = BucketConfig(resolution=64, step=32, min_side=32, max_side=128)
SIZES = [(64, 64), (90, 60), (60, 90), (70, 70), (128, 50), (64, 64)]


@pytest.fixture(scope="module")
def vae(tiny_models):
    return tiny_models.vae


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"1girl, tag_{i}, smile")
    return d


def make_dataset(image_dir: Path, flip_prob: float = 0.0, cfg: BucketConfig = SMALL, cache=None) -> BucketDataset:
    index = index_records(FolderSource(image_dir), BucketSet.from_config(cfg), progress=False)
    return BucketDataset(index, image=ImageConfig(flip_prob=flip_prob), seed=0, latent_cache=cache)


def fresh(ds: BucketDataset, vae, i: int, plan: CropPlan) -> torch.Tensor:
    rec = ds.index.records[i]
    arr, _ = load_cropped(rec.path, lambda w, h: plan)
    return encode_moments(vae, to_tensor(arr)[None])[0]


def test_cache_hit_equals_fresh_encode_and_rerun_reuses(image_dir, tmp_path, vae) -> None:
    cache = LatentCache.for_vae(tmp_path / "cache", vae)
    ds = make_dataset(image_dir, flip_prob=0.5)
    r1 = build_latent_cache(ds, vae, cache, batch_size=1, progress=False)
    assert (r1.total, r1.built, r1.reused) == (12, 12, 0)  # 6 images × 2 flip variants
    r2 = build_latent_cache(ds, vae, LatentCache.for_vae(tmp_path / "cache", vae), progress=False)
    assert (r2.built, r2.reused, r2.corrupt_rebuilt) == (0, 12, 0)
    for i in range(len(ds)):
        rec = ds.index.records[i]
        for flip in (False, True):
            base = ds.plan(i, 0, rec.width, rec.height)
            plan = CropPlan(
                base.orig_w, base.orig_h, base.bucket, base.resized_w, base.resized_h, base.left, base.top, flip
            )
            hit = cache.lookup(rec, plan)
            assert hit is not None and torch.equal(hit, fresh(ds, vae, i, plan))
            assert hit.shape == (8, plan.bucket.height // 2, plan.bucket.width // 2)  # tiny VAE: 4 ch, /2
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_changed_vae_bucket_crop_flip_or_image_miss(image_dir, tmp_path, vae) -> None:
    cache = LatentCache.for_vae(tmp_path / "c", vae)
    ds = make_dataset(image_dir)
    build_latent_cache(ds, vae, cache, progress=False)
    rec = ds.index.records[1]
    plan = ds.plan(1, 0, rec.width, rec.height)
    assert cache.lookup(rec, plan) is not None
    # VAE weights changed → another digest → everything rebuilt
    vae2 = copy.deepcopy(vae)
    with torch.no_grad():
        next(vae2.parameters()).add_(1e-3)
    cache2 = LatentCache.for_vae(tmp_path / "c", vae2)
    assert cache2.vae_digest != cache.vae_digest and cache2.lookup(rec, plan) is None
    assert build_latent_cache(ds, vae2, cache2, progress=False).built == len(ds)
    # crop offsets, flip, bucket: each a miss
    moved = CropPlan(
        plan.orig_w, plan.orig_h, plan.bucket, plan.resized_w, plan.resized_h, plan.left + 1, plan.top, False
    )
    flipped = CropPlan(plan.orig_w, plan.orig_h, plan.bucket, plan.resized_w, plan.resized_h, plan.left, plan.top, True)
    assert plan.left + 1 <= plan.resized_w - plan.bucket.width
    assert cache.lookup(rec, moved) is None and cache.lookup(rec, flipped) is None
    ds_big = make_dataset(image_dir, cfg=BucketConfig(resolution=96, step=32, min_side=32, max_side=192))
    r = build_latent_cache(ds_big, vae, cache, progress=False)
    assert r.built == len(ds) and r.reused == 0
    # image content changed (same path) → new content hash → rebuilt
    Image.fromarray(np.zeros((60, 90, 3), dtype=np.uint8)).save(rec.path)
    cache3 = LatentCache.for_vae(tmp_path / "c", vae)
    assert cache3.lookup(rec, plan) is None
    assert build_latent_cache(ds, vae, cache3, progress=False).built == 1


def test_corrupt_entries_detected_and_rebuilt(image_dir, tmp_path, vae) -> None:
    root = tmp_path / "c"
    cache = LatentCache.for_vae(root, vae)
    ds = make_dataset(image_dir)
    build_latent_cache(ds, vae, cache, progress=False)
    files = sorted((root / "latents").rglob("*.safetensors"))
    assert len(files) == len(ds)
    data = bytearray(files[0].read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern inside the tensor bytes
    files[0].write_bytes(bytes(data))
    files[1].write_bytes(files[1].read_bytes()[:100])  # truncated
    files[2].write_bytes(b"not a safetensors file")
    report = build_latent_cache(ds, vae, LatentCache.for_vae(root, vae), progress=False)
    assert (report.corrupt_rebuilt, report.built, report.reused) == (3, 3, len(ds) - 3)
    report = build_latent_cache(ds, vae, LatentCache.for_vae(root, vae), progress=False)
    assert (report.corrupt_rebuilt, report.built) == (0, 0)


def test_interrupted_build_resumes(image_dir, tmp_path, vae) -> None:
    class Boom(RuntimeError):
        pass

    class FlakyVAE(torch.nn.Module):
        """Works for two batches, then dies (like a killed job)."""

        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def encode(self, x):
            self.calls += 1
            if self.calls > 2:
                raise Boom()
            return self.inner.encode(x)

    cache = LatentCache.for_vae(tmp_path / "c", vae)
    ds = make_dataset(image_dir)
    with pytest.raises(Boom):
        build_latent_cache(ds, FlakyVAE(vae), cache, batch_size=1, progress=False)
    assert len(list((tmp_path / "c" / "latents").rglob("*.safetensors"))) == 2
    assert not list((tmp_path / "c").rglob("*.tmp"))
    r = build_latent_cache(ds, vae, LatentCache.for_vae(tmp_path / "c", vae), progress=False)
    assert (r.reused, r.built) == (2, len(ds) - 2)


def test_each_rank_caches_its_share(image_dir, tmp_path, vae) -> None:
    ds = make_dataset(image_dir)
    reports = [
        build_latent_cache(
            ds, vae, LatentCache.for_vae(tmp_path / "c", vae, rank=r), rank=r, world_size=2, progress=False
        )
        for r in range(2)
    ]
    assert [r.built for r in reports] == [3, 3]
    assert len(list((tmp_path / "c" / "latents").rglob("*.safetensors"))) == len(ds)
    assert sorted(p.name for p in (tmp_path / "c").glob("content_hashes.*.json")) == [
        "content_hashes.0.json",
        "content_hashes.1.json",
    ]


def test_dataset_serves_cached_latents_and_fills_gaps(image_dir, tmp_path, vae, caplog, monkeypatch) -> None:
    monkeypatch.setattr(encode, "_warned_uncached", False)
    caplog.set_level(logging.WARNING, logger="lokr_trainer.train.encode")
    cache = LatentCache.for_vae(tmp_path / "c", vae)
    ds = make_dataset(image_dir, cache=cache)
    # cache only rank 0's half: the rest arrives as pixels and is encoded + stored on the way
    build_latent_cache(ds, vae, cache, rank=0, world_size=2, progress=False)
    sampler = BucketBatchSampler(ds.index.bucket_ids, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    n_pixels = 0
    first: dict[int, torch.Tensor] = {}
    for batch in loader:
        n_pixels += len(batch["pixel_rows"])
        moments = fill_missing_latents(batch, vae, ds, cache)
        assert moments.shape[0] == batch["size"]
        for row, i in enumerate(batch["indices"]):
            # a VAE batch of 2 may round differently from a batch of 1 in the last bits
            torch.testing.assert_close(moments[row], fresh(ds, vae, i, batch["plans"][row]), rtol=1e-5, atol=1e-5)
            first[i] = moments[row]
    assert n_pixels == 3
    assert cache.stats.built == 6  # 3 by the build, 3 filled in the loop
    warned = [r.getMessage() for r in caplog.records if "not in the latent cache" in r.getMessage()]
    assert len(warned) == 1 and "storing them" in warned[0]  # once per process, not once per batch
    for batch in loader:  # second pass: everything is cached now, exactly what was stored
        assert batch["pixel_values"] is None and len(batch["latent_rows"]) == batch["size"]
        for row, i in enumerate(batch["indices"]):
            assert torch.equal(batch["latents"][row], first[i])


def test_latent_entry_of_another_size_is_an_error_not_a_rebuild(image_dir, tmp_path, vae) -> None:
    root = tmp_path / "c"
    cache = LatentCache.for_vae(root, vae)
    assert (cache.scale_factor, cache.latent_channels) == (2, 4)
    ds = make_dataset(image_dir)
    build_latent_cache(ds, vae, cache, progress=False)
    rec = ds.index.records[0]
    plan = ds.plan(0, 0, rec.width, rec.height)
    files = sorted((root / "latents").rglob("*.safetensors"))
    # the same VAE digest but a wrong scale factor: entries are intact but 2x too big for it
    wrong = LatentCache(root, cache.vae_digest, scale_factor=4, encode_dtype=cache.encode_dtype)
    h, w = plan.bucket.height, plan.bucket.width
    with pytest.raises(CacheError) as e:
        wrong.lookup(rec, plan)
    msg = str(e.value)
    assert f"(8, {h // 2}, {w // 2})" in msg and f"(*, {h // 4}, {w // 4})" in msg
    assert ".safetensors" in msg and str(root) in msg
    assert "another VAE" in msg and "delete the cache folder" in msg and "scale_factor" in msg
    with pytest.raises(CacheError, match="does not match this VAE"):
        build_latent_cache(ds, vae, wrong, progress=False)
    assert sorted((root / "latents").rglob("*.safetensors")) == files  # nothing deleted or rebuilt
    assert wrong.stats.corrupt == 0 and cache.lookup(rec, plan) is not None


def test_latent_entry_with_other_channels_is_an_error(image_dir, tmp_path, vae) -> None:
    root = tmp_path / "c"
    cache = LatentCache.for_vae(root, vae)
    ds = make_dataset(image_dir)
    build_latent_cache(ds, vae, cache, progress=False)
    rec = ds.index.records[0]
    plan = ds.plan(0, 0, rec.width, rec.height)
    # a reader that believes in a 8-channel VAE: stored moments have 2*4, it wants 2*8
    eight = LatentCache(root, cache.vae_digest, cache.scale_factor, cache.encode_dtype, latent_channels=8)
    with pytest.raises(CacheError, match=r"has shape \(8, \d+, \d+\), but this cache expects \(16, "):
        eight.lookup(rec, plan)
    # unchecked by default
    assert LatentCache(root, cache.vae_digest, cache.scale_factor, cache.encode_dtype).lookup(rec, plan) is not None
    # storing moments of the wrong width is refused up front, naming the image
    fresh_cache = LatentCache(tmp_path / "d", cache.vae_digest, cache.scale_factor, latent_channels=8)
    with pytest.raises(CacheError, match=f"latents for {rec.path}"):
        fresh_cache.store(rec, plan, cache.lookup(rec, plan))
    assert not list((tmp_path / "d" / "latents").rglob("*.safetensors"))


def test_random_crop_with_latent_cache_is_refused(image_dir, tmp_path, vae) -> None:
    index = index_records(FolderSource(image_dir), BucketSet.from_config(SMALL), progress=False)
    with pytest.raises(ConfigError, match="crop='center'"):
        BucketDataset(index, image=ImageConfig(crop="random"), latent_cache=LatentCache.for_vae(tmp_path, vae))


def test_sample_latents_from_moments(vae) -> None:
    moments = encode_moments(vae, torch.zeros(1, 3, 32, 32))
    a = sample_latents(moments, torch.Generator().manual_seed(1))
    b = sample_latents(moments, torch.Generator().manual_seed(1))
    c = sample_latents(moments, torch.Generator().manual_seed(2))
    assert a.shape == (1, 4, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    ref = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.sample(generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, ref.detach())


# ----------------------------------------------------------------------------- text-encoder cache


def test_te_cache_refused_with_clear_reasons() -> None:
    with pytest.raises(ConfigError, match="trained"):
        check_te_cache_allowed(CaptionConfig(shuffle_general=False), train_text_encoders=True)
    with pytest.raises(ConfigError, match=r"shuffle_general=True, tag_dropout=0\.1"):
        check_te_cache_allowed(CaptionConfig(tag_dropout=0.1), train_text_encoders=False)
    check_te_cache_allowed(CaptionConfig(shuffle_general=False), train_text_encoders=False)


def test_te_cache_hit_equals_fresh_encode_and_validates(image_dir, tmp_path, tiny_models) -> None:
    m = tiny_models
    enc = PromptEncoder(m.tokenizer, m.tokenizer_2, m.text_encoder, m.text_encoder_2, max_tokens=150)
    ds = make_dataset(image_dir)
    cap = Captioner(ds.index.records, CaptionConfig(shuffle_general=False))
    captions = [cap.fixed(r) for r in ds.index.records]
    cache = TextEncoderCache.for_encoder(tmp_path / "c", enc)
    r = build_text_cache(captions, enc, cache, batch_size=1, progress=False)
    assert (r.total, r.built) == (6, 6)
    assert build_text_cache(captions, enc, cache, progress=False).reused == 6
    hidden, pooled = cached_text_batch(captions[:3], cache)
    for k in range(3):
        with torch.no_grad():
            ref = enc([captions[k]])
        assert torch.equal(hidden[k], ref.hidden[0]) and torch.equal(pooled[k], ref.pooled[0])
    assert hidden.shape == (3, 152, 64)
    # other settings or other weights: a different cache namespace → misses
    enc300 = PromptEncoder(m.tokenizer, m.tokenizer_2, m.text_encoder, m.text_encoder_2, max_tokens=300)
    assert TextEncoderCache.for_encoder(tmp_path / "c", enc300).lookup(captions[0]) is None
    te2 = copy.deepcopy(m.text_encoder_2)
    with torch.no_grad():
        next(te2.parameters()).mul_(1.01)
    enc_b = PromptEncoder(m.tokenizer, m.tokenizer_2, m.text_encoder, te2, max_tokens=150)
    assert TextEncoderCache.for_encoder(tmp_path / "c", enc_b).lookup(captions[0]) is None
    # a corrupt entry is rebuilt; a missing caption without an encoder is a clear error
    f = sorted((tmp_path / "c" / "text").rglob("*.safetensors"))[0]
    f.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
    r = build_text_cache(captions, enc, TextEncoderCache.for_encoder(tmp_path / "c", enc), progress=False)
    assert (r.corrupt_rebuilt, r.built) == (1, 1)
    with pytest.raises(CacheError, match="not in the text-encoder cache"):
        cached_text_batch(["a caption nobody encoded"], cache)
    h, p = cached_text_batch(["a caption nobody encoded"], cache, enc)
    assert cache.lookup("a caption nobody encoded") is not None and h.shape == (1, 152, 64)


def test_te_cache_entry_of_other_widths_is_an_error(tmp_path, tiny_models) -> None:
    m = tiny_models
    enc = PromptEncoder(m.tokenizer, m.tokenizer_2, m.text_encoder, m.text_encoder_2, max_tokens=75)
    cache = TextEncoderCache.for_encoder(tmp_path / "c", enc)
    hidden = m.text_encoder.config.hidden_size + m.text_encoder_2.config.hidden_size
    assert (cache.hidden_dim, cache.pooled_dim) == (hidden, m.text_encoder_2.config.projection_dim)
    build_text_cache(["1girl, smile"], enc, cache, progress=False)
    h, p = cache.lookup("1girl, smile")
    assert h.shape[-1] == cache.hidden_dim and p.shape == (cache.pooled_dim,)
    digest, settings = cache.te_digest, enc.settings
    wide = rf"text cache entry .*\.safetensors has hidden .*expected \(L, {hidden + 1}\)"
    with pytest.raises(CacheError, match=wide):
        TextEncoderCache(tmp_path / "c", digest, settings, hidden_dim=hidden + 1).lookup("1girl, smile")
    with pytest.raises(CacheError, match=r"pooled .*expected \(7,\).*delete the cache folder"):
        TextEncoderCache(tmp_path / "c", digest, settings, pooled_dim=7).lookup("1girl, smile")
    assert TextEncoderCache(tmp_path / "c", digest, settings).lookup("1girl, smile") is not None  # unchecked
    with pytest.raises(CacheError, match="caption '1girl'"):
        cache.store("1girl", h[:, :-1], p)
    assert cache.lookup("1girl") is None  # nothing was written


def test_data_package_imports_no_model_code() -> None:
    code = (
        "import sys, lokr_trainer.data, lokr_trainer.data.stream, lokr_trainer.data.stats; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers') "
        "or m.startswith(('lokr_trainer.train', 'lokr_trainer.sdxl', 'lokr_trainer.lokr'))); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_wrong_metadata_size_is_skipped_not_cached(image_dir, tmp_path, vae) -> None:
    index = index_records(FolderSource(image_dir), BucketSet.from_config(SMALL), progress=False)
    index.records[0].width, index.records[0].height = 200, 100  # metadata that lies about the file
    ds = BucketDataset(index, seed=0)
    cache = LatentCache.for_vae(tmp_path / "c", vae)
    report = build_latent_cache(ds, vae, cache, progress=False)
    assert (report.built, report.skipped) == (len(ds) - 1, 1)
    assert report.skipped_paths == [index.records[0].path]
