"""Bad and unusual image files, generated here: each is decoded correctly or skipped, logged and counted."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lokr_trainer.data.buckets import Bucket, BucketConfig, BucketSet, plan_crop
from lokr_trainer.data.dataset import BucketDataset, ImageConfig, collate, index_records
from lokr_trainer.data.images import DecodeOptions, SkipLog, decode_image, load_cropped, probe_size
from lokr_trainer.data.sampler import BucketBatchSampler
from lokr_trainer.data.sources import FolderSource
from lokr_trainer.errors import BadImageError


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def write_png_raw(path: Path, width: int, height: int, bit_depth: int, color_type: int, raw_rows: bytes) -> None:
    """A PNG written by hand, for layouts Pillow cannot save (48-bit RGB) or must not allocate (bombs)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw_rows, 9))
    path.write_bytes(data + _chunk(b"IEND", b""))


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)


@pytest.fixture()
def bad_dir(tmp_path: Path) -> dict[str, Path]:
    """One file per hazard named in the issue, plus two good images."""
    d = tmp_path / "imgs"
    d.mkdir()
    files: dict[str, Path] = {}

    files["empty"] = d / "empty.jpg"
    files["empty"].write_bytes(b"")

    full = d / "full.jpg"
    noise_image(256, 256, 1).save(full, quality=90)
    files["truncated"] = d / "truncated.jpg"
    files["truncated"].write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full.unlink()

    files["not_image"] = d / "notes.png"
    files["not_image"].write_text("this is a text file with an image extension\n" * 20)

    files["cmyk"] = d / "cmyk.jpg"
    Image.new("CMYK", (128, 96), (0, 255, 255, 0)).save(files["cmyk"], quality=95)  # pure red in CMYK

    files["gray16"] = d / "gray16.png"
    Image.fromarray(np.full((64, 80), 0x8000, dtype=np.uint16)).save(files["gray16"])

    files["rgb16"] = d / "rgb16.png"
    px = np.zeros((40, 48, 3), dtype=">u2")
    px[..., 0], px[..., 1], px[..., 2] = 0xFFFF, 0x8000, 0x0000
    rows = b"".join(b"\x00" + px[y].tobytes() for y in range(px.shape[0]))
    write_png_raw(files["rgb16"], 48, 40, 16, 2, rows)

    files["palette"] = d / "palette.png"
    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red (transparent), 1 blue
    pal.paste(1, (32, 0, 64, 64))
    pal.save(files["palette"], transparency=0)

    files["rgba"] = d / "rgba.png"
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 0] = 0
    rgba[..., 3] = 128  # half-transparent black on white → mid grey
    Image.fromarray(rgba, "RGBA").save(files["rgba"])

    files["exif"] = d / "rotated.jpg"
    stored = np.zeros((32, 64, 3), dtype=np.uint8)
    stored[:, :32] = (255, 0, 0)  # stored left half red
    stored[:, 32:] = (0, 255, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # display = rotate 90° clockwise
    Image.fromarray(stored).save(files["exif"], quality=95, exif=exif.tobytes())

    files["bomb"] = d / "bomb.png"
    # 100 000 × 100 000 1-bit image claimed by the header; refusal must come before decoding.
    write_png_raw(files["bomb"], 100_000, 100_000, 1, 0, b"\x00" * (1 + 100_000 // 8) * 16)

    files["good"] = d / "good.webp"
    noise_image(320, 200, 2).save(files["good"], quality=90)
    files["good2"] = d / "good2.png"
    noise_image(200, 320, 3).save(files["good2"])
    return files


def test_unreadable_files_raise_bad_image_error_with_kind(bad_dir) -> None:
    expect = {"empty": "empty", "not_image": "not_an_image", "bomb": "too_large"}
    for name, kind in expect.items():
        with pytest.raises(BadImageError) as ei:
            probe_size(bad_dir[name])
        assert ei.value.kind == kind and ei.value.path == str(bad_dir[name])
    # a truncated JPEG has a valid header; the decode finds it
    assert probe_size(bad_dir["truncated"]) == (256, 256)
    with pytest.raises(BadImageError) as ei:
        decode_image(bad_dir["truncated"])
    assert ei.value.kind == "truncated" and "truncated.jpg" in str(ei.value)
    with pytest.raises(BadImageError) as ei:
        probe_size(bad_dir["empty"].with_name("missing.jpg"))
    assert ei.value.kind == "missing"


def test_pixel_limit_is_ours_not_pillows_global(bad_dir) -> None:
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadImageError, match="max_pixels"):
        probe_size(bad_dir["good"], opts=DecodeOptions(max_pixels=320 * 200 - 1))
    assert probe_size(bad_dir["good"], opts=DecodeOptions(max_pixels=320 * 200)) == (320, 200)
    assert Image.MAX_IMAGE_PIXELS == before


def test_cmyk_is_converted_to_rgb(bad_dir) -> None:
    arr = np.asarray(decode_image(bad_dir["cmyk"]))
    assert arr.shape == (96, 128, 3)
    r, g, b = arr.reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_scaled_not_clipped(bad_dir) -> None:
    gray = np.asarray(decode_image(bad_dir["gray16"]))
    assert gray.shape == (64, 80, 3) and np.all(np.abs(gray.astype(int) - 128) <= 1)  # 0x8000 → 128, not 255
    rgb = np.asarray(decode_image(bad_dir["rgb16"]))
    assert rgb.shape == (40, 48, 3)
    assert np.all(np.abs(rgb.reshape(-1, 3).astype(int) - (255, 128, 0)) <= 1)


def test_palette_transparency_composited_on_white(bad_dir) -> None:
    arr = np.asarray(decode_image(bad_dir["palette"]))
    assert (arr[:, :32] == 255).all()  # transparent red → white, not red or black
    assert (arr[:, 32:] == (0, 0, 255)).all()
    grey = np.asarray(decode_image(bad_dir["rgba"]))
    assert np.all(np.abs(grey.astype(int) - 127) <= 1)
    black_bg = np.asarray(decode_image(bad_dir["palette"], opts=DecodeOptions(background=(0, 0, 0))))
    assert (black_bg[:, :32] == 0).all()


def test_exif_rotation_applied_and_reported_as_original_size(bad_dir) -> None:
    assert probe_size(bad_dir["exif"]) == (32, 64)
    arr = np.asarray(decode_image(bad_dir["exif"]))
    assert arr.shape == (64, 32, 3)
    top, bottom = arr[:28].reshape(-1, 3).mean(0), arr[36:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[1] < 60  # stored left (red) is displayed on top
    assert bottom[1] > 200 and bottom[0] < 60
    out, plan = load_cropped(bad_dir["exif"], lambda w, h: plan_crop(w, h, Bucket(64, 128)))
    assert (plan.orig_w, plan.orig_h) == (32, 64) and plan.time_ids()[:2] == (64, 32)
    assert out.shape == (128, 64, 3)


def test_load_cropped_matches_resize_then_crop(tmp_path: Path) -> None:
    img = noise_image(900, 1300, 4)
    for name, kw in (("a.png", {}), ("a.jpg", {"quality": 95})):
        p = tmp_path / name
        img.save(p, **kw)
        ref_img = Image.open(p).convert("RGB")
        for flip in (False, True):
            plan = plan_crop(900, 1300, Bucket(512, 640), "random", np.random.default_rng(3), flip=flip)
            ref = ref_img.resize((plan.resized_w, plan.resized_h), Image.Resampling.LANCZOS)
            ref = ref.crop((plan.left, plan.top, plan.left + 512, plan.top + 640))
            if flip:
                ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            out, got = load_cropped(p, lambda w, h: plan)
            assert got == plan and out.shape == (640, 512, 3)
            diff = np.abs(out.astype(int) - np.asarray(ref, dtype=int))
            assert diff.mean() < 2.0, (name, flip, diff.mean())


def test_jpeg_draft_decodes_smaller_but_same_picture(tmp_path: Path) -> None:
    p = tmp_path / "big.jpg"
    noise_image(2400, 3200, 5).save(p, quality=92)
    plan_fn = lambda w, h: plan_crop(w, h, Bucket(384, 512))  # noqa: E731
    fast, _ = load_cropped(p, plan_fn, opts=DecodeOptions(jpeg_draft=True))
    slow, _ = load_cropped(p, plan_fn, opts=DecodeOptions(jpeg_draft=False))
    assert fast.shape == slow.shape == (512, 384, 3)
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 3.0
    small = decode_image(p, min_size=(384, 512))
    assert small.size[0] < 2400 and small.size[0] >= 384 and small.size[1] >= 512


def test_bad_images_do_not_stop_a_run_and_are_logged_and_counted(bad_dir, caplog) -> None:
    caplog.set_level(logging.WARNING)
    skips = SkipLog()
    bs = BucketSet.from_config(BucketConfig(resolution=128, step=64, min_side=64, max_side=256))
    index = index_records(FolderSource(bad_dir["good"].parent), bs, skip_log=skips, progress=False)
    # header-level failures are found while indexing
    assert skips.counts == {"empty": 1, "not_an_image": 1, "too_large": 1}
    kept = {Path(r.path).name for r in index.records}
    assert kept == {"truncated.jpg", "cmyk.jpg", "gray16.png", "rgb16.png", "palette.png", "rgba.png",
                    "rotated.jpg", "good.webp", "good2.png"}  # fmt: skip
    ds = BucketDataset(index, image=ImageConfig(flip_prob=0.5), seed=0)
    sampler = BucketBatchSampler(index.bucket_ids, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=2)
    seen: list[str] = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for batch in loader:
            skips.add_batch(batch)
            if batch["size"]:
                assert batch["pixel_values"].shape[0] == batch["size"] == len(batch["captions"])
                b = {tuple(t[4:].tolist()) for t in batch["time_ids"]}
                assert len(b) == 1  # one bucket per batch
                assert batch["pixel_values"].shape[-2:] == tuple(int(x) for x in next(iter(b)))
                assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
            seen += batch["keys"]
    # decode-level failures are reported from the worker processes and counted once per file
    assert skips.counts == {"empty": 1, "not_an_image": 1, "too_large": 1, "truncated": 1}
    assert sorted(set(seen)) == sorted(kept - {"truncated.jpg"}) and len(seen) == 2 * 8
    assert "skipped 4 images" in skips.summary()
    for name in ("empty", "not_image", "bomb", "truncated"):
        assert str(bad_dir[name]) in caplog.text
        assert sum(str(bad_dir[name]) in m for m in caplog.messages) == 1  # logged once, not every epoch


def test_dataset_time_ids_are_the_real_original_size_and_crop(tmp_path: Path) -> None:
    d = tmp_path / "ds"
    d.mkdir()
    sizes = [(300, 200), (200, 300), (257, 255), (640, 160)]
    for i, (w, h) in enumerate(sizes):
        noise_image(w, h, i).save(d / f"{i}.png")
    bs = BucketSet.from_config(BucketConfig(resolution=128, step=64, min_side=64, max_side=512))
    index = index_records(FolderSource(d), bs, progress=False)
    ds = BucketDataset(index, image=ImageConfig(crop="random", flip_prob=0.5), seed=4)
    flips = set()
    for i, rec in enumerate(index.records):
        w, h = sizes[int(Path(rec.path).stem)]
        s = ds[(0, i)]
        plan = s["plan"]
        assert (plan.orig_w, plan.orig_h) == (w, h) and plan.bucket == index.bucket_of(i)
        assert tuple(int(x) for x in s["time_ids"]) == (h, w, plan.crop_top, plan.crop_left, plan.bucket.height,
                                                          plan.bucket.width)  # fmt: skip
        assert s["pixel_values"].shape == (3, plan.bucket.height, plan.bucket.width)
        # same (seed, epoch, index) → same crop, flip, pixels and caption; other epochs draw anew
        again = ds[(0, i)]
        assert again["plan"] == plan and torch.equal(again["pixel_values"], s["pixel_values"])
        assert again["caption"] == s["caption"]
        plans = {ds[(e, i)]["plan"] for e in range(12)}
        flips |= {p.flip for p in plans}
        if plan.resized_w - plan.bucket.width + plan.resized_h - plan.bucket.height > 8:
            assert len({(p.left, p.top) for p in plans}) > 1
    assert flips == {False, True}


def _png(w: int, h: int, rows_kept: int | None = None, interlace: bool = False) -> tuple[bytes, np.ndarray]:
    """A hand-made RGB PNG; ``rows_kept`` cuts the (complete, valid) zlib stream short of the IHDR's height."""

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    arr = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    parts = [arr[y0::dy, x0::dx] for x0, y0, dx, dy in passes] if interlace else [arr]
    rows = [b"\x00" + r.tobytes() for p in parts if p.size for r in p]
    if rows_kept is not None:
        rows = rows[:rows_kept]
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, int(interlace))
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")
    return data, arr


@pytest.mark.parametrize("interlace", [False, True])
def test_a_png_whose_pixel_data_ends_early_is_a_truncated_skip_not_a_black_image(interlace):
    good, arr = _png(37, 29, interlace=interlace)
    assert (np.asarray(decode_image(good)) == arr).all()  # complete PNGs (also Adam7) decode as before
    short, _ = _png(37, 29, rows_kept=10, interlace=interlace)
    with pytest.raises(BadImageError, match="ends early") as e:
        decode_image(short)
    assert e.value.kind == "truncated"


def test_fifos_folders_and_broken_links_named_like_images_are_counted_and_logged(tmp_path, caplog):
    import os

    from lokr_trainer.data import BucketConfig, BucketSet, FolderSource, index_records

    noise_image(64, 64, 1).save(tmp_path / "good.png")
    os.mkfifo(tmp_path / "pipe.png")  # opening it would block the run forever
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "broken.png").symlink_to(tmp_path / "gone.png")
    log = SkipLog()
    with caplog.at_level("WARNING"):
        index = index_records(FolderSource(tmp_path), BucketSet.from_config(BucketConfig(64, 16, 32, 128)),
                              skip_log=log, progress=False)
    assert [r.key for r in index.records] == ["good.png"]
    assert log.total == 3 and log.counts == {"not_an_image": 2, "missing": 1}
    for name, why in (("pipe.png", "is a FIFO"), ("folder.png", "is a folder"), ("broken.png", "broken symbolic link")):
        assert any(name in m and why in m for m in caplog.messages), (name, caplog.messages)
