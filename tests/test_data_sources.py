"""Sources (folder + sidecars, JSONL manifest, tar shards), the shard stream, and the statistics CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lokr_trainer.data.__main__ import main as stats_main
from lokr_trainer.data.buckets import BucketConfig, BucketSet
from lokr_trainer.data.dataset import ImageConfig, index_records, probe_record_size
from lokr_trainer.data.images import SkipLog
from lokr_trainer.data.sources import FolderSource, ManifestSource, WebDatasetSource, open_source
from lokr_trainer.data.stream import ShardBucketStream
from lokr_trainer.data.tags import CaptionConfig, Captioner
from lokr_trainer.errors import BadImageError, DataError, ManifestError

SMALL = BucketConfig(resolution=64, step=32, min_side=32, max_side=128)


def img_bytes(w: int, h: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "ds"
    (d / "sub").mkdir(parents=True)
    (d / "a.png").write_bytes(img_bytes(64, 48))
    (d / "a.txt").write_text("1girl, long_hair, smile\n")
    (d / "b.jpg").write_bytes(img_bytes(48, 64, "JPEG"))
    (d / "b.jpg.json").write_text(
        json.dumps(
            {  # gallery-dl / danbooru API style
                "tag_string_general": "1girl solo ^_^ long_hair",
                "tag_string_character": "hatsune_miku",
                "tag_string_copyright": "vocaloid",
                "tag_string_artist": "ask_(askzy)",
                "tag_string_meta": "highres commentary_request",
                "rating": "e",
                "fav_count": 120,
                "created_at": "2019-03-01T10:00:00.000-05:00",
                "image_width": 48,
                "image_height": 64,
            }
        )
    )
    (d / "sub" / "c.webp").write_bytes(img_bytes(64, 64, "WEBP"))
    (d / "sub" / "c.json").write_text(
        json.dumps(
            {
                "tags": {"general": ["scenery", "no_humans"], "series": "touhou, genshin_impact"},
                "rating": "general",
                "date": "2012-05-05",
                "caption": "A quiet shrine at dusk.",
            }
        )
    )
    (d / "d.png").write_bytes(img_bytes(40, 40))
    (d / "d.txt").write_text("my style, 1boy ||| smile, outdoors")
    (d / "e.png").write_bytes(img_bytes(64, 32))  # no sidecar
    (d / "f.png").write_bytes(img_bytes(32, 64))
    (d / "f.json").write_text(json.dumps({"rating": "q", "fav_count": 3}))
    (d / "f.txt").write_text("cat_ears, tail")
    (d / "notes.md").write_text("not part of the dataset")
    return d


def test_folder_source_reads_sidecars(folder: Path) -> None:
    recs = {r.key: r for r in FolderSource(folder)}
    assert list(recs) == ["a.png", "b.jpg", "d.png", "e.png", "f.png", "sub/c.webp"]
    assert recs["a.png"].tags == {"general": ["1girl", "long_hair", "smile"]}
    b = recs["b.jpg"]
    assert b.tags["character"] == ["hatsune_miku"] and b.tags["meta"] == ["highres", "commentary_request"]
    assert (b.rating, b.fav_count, b.year, b.width, b.height) == ("explicit", 120, 2019, 48, 64)
    c = recs["sub/c.webp"]
    assert c.tags["copyright"] == ["touhou", "genshin_impact"] and c.caption == "A quiet shrine at dusk."
    assert (c.rating, c.year) == ("general", 2012)
    assert recs["d.png"].head == ["my style", "1boy"] and recs["d.png"].tags["general"] == ["smile", "outdoors"]
    assert recs["e.png"].tags == {} and recs["e.png"].caption is None
    f = recs["f.png"]  # JSON without tags + text tags: both used
    assert (f.rating, f.fav_count, f.tags["general"]) == ("questionable", 3, ["cat_ears", "tail"])
    cap = Captioner(list(recs.values()), CaptionConfig(shuffle_general=False, quality_tags=False))
    assert cap.fixed(b) == (
        "1girl, hatsune miku, vocaloid, ask (askzy), nsfw, explicit, recent, solo, ^_^, long hair, highres"
    )
    assert cap.fixed(recs["d.png"]) == "my style, 1boy, smile, outdoors"


def test_folder_keep_tokens_and_errors(folder: Path, tmp_path: Path) -> None:
    recs = {r.key: r for r in FolderSource(folder, keep_tokens=1)}
    assert recs["a.png"].head == ["1girl"] and recs["a.png"].tags["general"] == ["long_hair", "smile"]
    (folder / "e.json").write_text("{not json")
    with pytest.raises(ManifestError, match=r"e\.json.*invalid JSON"):
        list(FolderSource(folder))
    (folder / "e.json").write_text(json.dumps({"tags": {"species": ["fox"], "general": "smile"}}))
    assert {r.key: r for r in FolderSource(folder)}["e.png"].tags == {"general": ["fox", "smile"]}
    (folder / "e.json").write_text(json.dumps({"rating": "spicy"}))
    with pytest.raises(ManifestError, match="unknown rating 'spicy'"):
        list(FolderSource(folder))
    with pytest.raises(DataError, match="not a directory"):
        list(FolderSource(tmp_path / "nope"))


def test_manifest_source(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "1.png").write_bytes(img_bytes(64, 64))
    (tmp_path / "imgs" / "2.png").write_bytes(img_bytes(96, 64))
    lines = [
        {"path": "imgs/1.png", "tags": {"general": ["smile"], "artist": ["x"]}, "rating": "s", "fav_count": 7,
         "created_at": "2023-01-01", "caption": "hi"},
        {"path": "imgs/2.png", "tags": "a, b"},
        {"path": "imgs/missing.png"},
    ]  # fmt: skip
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    recs = list(ManifestSource(m))
    assert [r.key for r in recs] == ["imgs/1.png", "imgs/2.png", "imgs/missing.png"]
    assert recs[0].path == str(tmp_path / "imgs" / "1.png")
    assert (recs[0].rating, recs[0].fav_count, recs[0].year, recs[0].caption) == ("sensitive", 7, 2023, "hi")
    assert recs[1].tags == {"general": ["a", "b"]}
    skips = SkipLog()
    index = index_records(recs, BucketSet.from_config(SMALL), skip_log=skips, progress=False)
    assert len(index) == 2 and skips.counts == {"missing": 1}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"tags": "x"}) + "\n")
    with pytest.raises(ManifestError, match=r"bad\.jsonl:2: each line needs"):
        list(ManifestSource(bad))
    bad.write_text(json.dumps(lines[0]) + "\n\n{oops\n")
    with pytest.raises(ManifestError, match=r"bad\.jsonl:3: invalid JSON"):
        list(ManifestSource(bad))


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture()
def shards(tmp_path: Path) -> str:
    d = tmp_path / "shards"
    d.mkdir()
    sizes = [(64, 64), (96, 64), (64, 96), (64, 64), (128, 48), (64, 64), (96, 64), (64, 64)]
    k = 0
    for s in range(4):
        members = []
        for _ in range(2):
            w, h = sizes[k]
            members.append((f"{k:05d}.jpg", img_bytes(w, h, "JPEG", seed=k)))
            meta = {"tags": {"general": [f"t_{k}", "smile"]}, "rating": "g", "fav_count": k}
            members.append((f"{k:05d}.json", json.dumps(meta).encode()))
            k += 1
        if s == 1:
            members.append(("broken.jpg", b"garbage, not a jpeg"))
            members.append(("noimage.txt", b"a caption without an image"))
        write_shard(d / f"part-{s:06d}.tar", members)
    (d / "part-000004.tar").write_bytes(b"\x00garbage" * 100)  # corrupt shard
    return str(d / "part-{000000..000004}.tar")


def test_webdataset_source(shards: str) -> None:
    pytest.importorskip("webdataset")
    src = WebDatasetSource(shards)
    assert len(src.shards) == 5
    recs = list(src)
    keys = [f"{k:05d}" for k in range(8)]
    assert [r.key for r in recs] == keys[:4] + ["broken"] + keys[4:]  # shard order, member order
    assert recs[0].tags == {"general": ["t_0", "smile"]} and recs[0].rating == "general"
    assert recs[0].image_source() == img_bytes(64, 64, "JPEG", seed=0)
    assert src.missing_image == 1 and src.bad_shards == [shards.replace("{000000..000004}", "000004")]
    assert isinstance(open_source(shards), WebDatasetSource)
    assert src.shard_range(1, 2) == src.shards[1::2]


def test_local_plain_shards_are_read_in_place_and_compressed_ones_streamed(shards: str, tmp_path: Path) -> None:
    """Indexing a local .tar keeps no image bytes (a shard set larger than RAM trains); .tar.gz holds them."""
    import gzip

    pytest.importorskip("webdataset")
    plain = Path(shards.replace("{000000..000004}", "000000"))
    packed = tmp_path / "packed.tar.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    in_place, in_memory = list(WebDatasetSource(str(plain))), list(WebDatasetSource(str(packed)))
    assert [r.key for r in in_place] == [r.key for r in in_memory] == ["00000", "00001"]
    assert all(r.data is None and r.path == str(plain) and r.offset % 512 == 0 for r in in_place)
    assert all(r.data is not None and r.offset is None for r in in_memory)
    for a, b in zip(in_place, in_memory):
        assert a.image_source() == b.data and a.tags == b.tags and a.fav_count == b.fav_count
        assert probe_record_size(a) == probe_record_size(b) == Image.open(io.BytesIO(b.data)).size
    assert in_place[0].where == f"{plain}:00000"

    # the shard changes under a run: a clear per-image skip, never other bytes
    cut = tmp_path / "cut.tar"
    cut.write_bytes(plain.read_bytes())
    rec = list(WebDatasetSource(str(cut)))[1]
    cut.write_bytes(plain.read_bytes()[: rec.offset + 10])
    with pytest.raises(BadImageError, match="changed after it was indexed") as e:
        rec.image_source()
    assert e.value.kind == "changed"
    rec.shard_stamp = None  # a record made by hand, without the stamp: the short read is still caught
    with pytest.raises(BadImageError, match="ends inside this member") as e:
        rec.image_source()
    assert e.value.kind == "truncated"
    cut.unlink()
    with pytest.raises(BadImageError, match="not found") as e:
        probe_record_size(rec)
    assert e.value.kind == "missing" and str(cut) in str(e.value)


def test_a_shard_rewritten_after_indexing_is_refused_per_image_not_read_at_stale_offsets(tmp_path: Path) -> None:
    pytest.importorskip("webdataset")
    cat, dog = img_bytes(32, 32, "BMP", seed=1), img_bytes(32, 32, "BMP", seed=2)  # BMP: equal sizes
    shard = tmp_path / "s.tar"
    write_shard(shard, [("cat.bmp", cat), ("dog.bmp", dog)])
    recs = {r.key: r for r in WebDatasetSource(str(shard))}
    assert recs["cat"].image_source() == cat
    size = shard.stat().st_size
    write_shard(shard, [("dog.bmp", dog), ("cat.bmp", cat)])  # same size, members swapped
    assert shard.stat().st_size == size
    for key in ("cat", "dog"):
        with pytest.raises(BadImageError, match="changed after it was indexed") as e:
            recs[key].image_source()
        assert e.value.kind == "changed"
        with pytest.raises(BadImageError, match="changed after it was indexed"):
            probe_record_size(recs[key])
    assert {r.key: r.image_source() for r in WebDatasetSource(str(shard))} == {"cat": cat, "dog": dog}


def test_sparse_tar_members_are_read_as_their_content_not_at_their_offset(tmp_path: Path) -> None:
    """GNU tar --sparse stores a member's data compacted: offset + size do not hold its bytes."""
    import shutil

    pytest.importorskip("webdataset")
    if shutil.which("tar") is None:
        pytest.fail("this test needs GNU tar on PATH to write a sparse member")
    pixels = np.zeros((256, 256, 3), np.uint8)
    pixels[:4], pixels[-4:] = 200, 100
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "BMP")
    data = buf.getvalue()
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "000.bmp", "wb") as f:  # written with a hole, so that tar stores it sparse
        f.write(data[:8192])
        f.truncate(len(data))
        f.seek(len(data) - 8192)
        f.write(data[-8192:])
    (src / "001.png").write_bytes(img_bytes(64, 64, seed=3))
    shard = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(shard), "-C", str(src), "000.bmp", "001.png"],
                   check=True)
    with tarfile.open(shard) as tf:
        assert tf.getmember("000.bmp").issparse(), "tar did not store the member sparse on this file system"
    recs = {r.key: r for r in WebDatasetSource(str(shard))}
    assert recs["000"].image_source() == data and recs["000"].offset is None  # read, as when streaming
    assert recs["001"].image_source() == img_bytes(64, 64, seed=3) and recs["001"].offset is not None


def test_shard_stream_batches(shards: str) -> None:
    pytest.importorskip("webdataset")
    src = WebDatasetSource(shards)
    bs = BucketSet.from_config(SMALL)
    cap = Captioner(cfg=CaptionConfig(tag_dropout=0.5), seed=0)

    def run(rank=0, world=1, workers=0, epoch=0):
        ds = ShardBucketStream(src, bs, cap, batch_size=2, image=ImageConfig(flip_prob=0.5), seed=3,
                               rank=rank, world_size=world)  # fmt: skip
        ds.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        skips = SkipLog()
        batches = []
        for b in loader:
            skips.add_batch(b)
            batches.append(b)
        return batches, skips

    batches, skips = run()
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == [f"{k:05d}" for k in range(8)]
    for b in batches:
        if b["size"]:
            assert len({tuple(t[4:].tolist()) for t in b["time_ids"]}) == 1
            assert b["pixel_values"].shape[0] == b["size"] <= 2
    assert skips.counts == {"not_an_image": 1, "bad_shard": 1}
    again, _ = run()
    assert [b["captions"] for b in again] == [b["captions"] for b in batches]
    assert [b["keys"] for b in run(epoch=1)[0]] != [b["keys"] for b in batches]  # shard order per epoch
    # captions and crops depend on (seed, epoch, key), not on workers: same per-key results with 2 workers
    per_key = {k: (c, f) for b in batches for k, c, f in zip(b["keys"], b["captions"], b["flips"])}
    two, _ = run(workers=2)
    assert {k: (c, f) for b in two for k, c, f in zip(b["keys"], b["captions"], b["flips"])} == per_key
    r0, r1 = run(rank=0, world=2)[0], run(rank=1, world=2)[0]
    k0, k1 = {k for b in r0 for k in b["keys"]}, {k for b in r1 for k in b["keys"]}
    assert not k0 & k1 and k0 | k1 == set(per_key)


def test_open_source_dispatch(folder: Path, tmp_path: Path) -> None:
    assert isinstance(open_source(folder), FolderSource)
    m = tmp_path / "x.jsonl"
    m.write_text("")
    assert isinstance(open_source(m), ManifestSource)
    with pytest.raises(DataError, match="not a folder"):
        open_source(tmp_path / "nothing.bin")


def test_stats_cli_json_and_text(folder: Path, capsys) -> None:
    (folder / "zero.png").write_bytes(b"")
    assert stats_main([str(folder), "--resolution", "64", "--step", "32", "--min-side", "32",
                       "--max-side", "128", "--json"]) == 0  # fmt: skip
    s = json.loads(capsys.readouterr().out)
    assert s["images"] == 6 and s["skipped"]["by_kind"] == {"empty": 1}
    assert sum(s["buckets"].values()) == 6 and "64x64" in s["buckets"]
    assert s["ratings"] == {"unrated": 3, "explicit": 1, "general": 1, "questionable": 1}
    assert s["dates"]["recent"] == 1 and s["dates"]["early"] == 1
    assert s["quality"]["none"] == 4  # only b and f have fav_count
    assert s["tokens"]["max"] > 0 and s["tokens"]["over_75"] == 0
    assert ["hatsune miku", 1] in s["top_tags"]["character"]
    assert stats_main([str(folder), "--resolution", "64", "--step", "32", "--min-side", "32",
                       "--max-side", "128", "--batch-size", "4", "--no-tokens"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "images: 6   skipped: 1" in text and "buckets (" in text and "fewer than batch_size=4" in text
    assert "empty: 1" in text and "zero.png" in text
    assert stats_main([str(folder / "missing_dir")]) == 2
    assert "error:" in capsys.readouterr().err


def test_stats_cli_module_entry_point(folder: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lokr_trainer.data", str(folder), "--resolution", "64", "--step", "32",
         "--min-side", "32", "--max-side", "128", "--no-tokens"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "images: 6   skipped: 0" in out.stdout and "ratings:" in out.stdout


def test_stats_over_shards(shards: str, capsys) -> None:
    pytest.importorskip("webdataset")
    assert stats_main([shards, "--resolution", "64", "--step", "32", "--min-side", "32", "--max-side", "128",
                       "--no-tokens", "--json"]) == 0  # fmt: skip
    s = json.loads(capsys.readouterr().out)
    assert s["images"] == 8 and s["skipped"]["by_kind"] == {"not_an_image": 1, "bad_shard": 1}


def test_shards_without_webdataset_give_install_hint(shards: str, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "webdataset", None)  # import fails as if not installed
    with pytest.raises(DataError, match=r"pip install 'lokr-trainer\[webdataset\]'"):
        WebDatasetSource(shards)


@pytest.mark.parametrize("bad", [0, -64, 10**12, 1024.5, True, "wide", [64]])
def test_absurd_sidecar_sizes_are_refused_naming_the_file(tmp_path: Path, bad) -> None:
    d = tmp_path / "ds"
    d.mkdir()
    (d / "a.png").write_bytes(img_bytes(64, 48))
    (d / "a.json").write_text(json.dumps({"tags": "x", "width": bad, "height": 48}))
    with pytest.raises(ManifestError) as e:
        list(FolderSource(d))
    assert "a.json" in str(e.value) and "width" in str(e.value)


def test_a_wrong_sidecar_size_is_a_logged_skip_not_a_squashed_image(tmp_path: Path) -> None:
    """The sidecar chose the bucket; the header read during decode catches a size off by more than rounding."""
    from lokr_trainer.data.dataset import BucketDataset, collate

    d = tmp_path / "ds"
    d.mkdir()
    for name, (w, h), stated in (("ok", (64, 48), (64, 48)), ("round", (64, 48), (65, 47)), ("wrong", (48, 64), (64, 48))):
        (d / f"{name}.png").write_bytes(img_bytes(w, h))
        (d / f"{name}.json").write_text(json.dumps({"tags": name, "width": stated[0], "height": stated[1]}))
    index = index_records(FolderSource(d), BucketSet.from_config(SMALL), progress=False)
    assert len(index) == 3  # trusted at index time: no header read per image
    ds = BucketDataset(index, image=ImageConfig(), seed=0)
    items = {Path(index.records[i].path).stem: ds[i] for i in range(len(index))}
    assert "pixel_values" in items["ok"] and "pixel_values" in items["round"]
    where, reason, kind = items["wrong"]["skip"]
    assert kind == "wrong_size" and "wrong.png" in where and "64x48" in reason and "48x64" in reason
    batch = collate([items["ok"], items["wrong"]])
    assert batch["pixel_values"].shape[0] == 1


def test_verify_puts_a_wrong_sidecar_size_in_the_files_bucket_and_says_so(tmp_path: Path, caplog) -> None:
    """data.verify_sizes (on by default in runs): the header read corrects the stated size before bucketing."""
    d = tmp_path / "ds"
    d.mkdir()
    (d / "wrong.png").write_bytes(img_bytes(40, 128))  # tall
    (d / "wrong.json").write_text(json.dumps({"tags": "x", "width": 128, "height": 40}))  # says wide
    (d / "round.png").write_bytes(img_bytes(64, 48))
    (d / "round.json").write_text(json.dumps({"tags": "x", "width": 65, "height": 47}))
    bs = BucketSet.from_config(SMALL)
    trusted = index_records(FolderSource(d), bs, progress=False)
    with caplog.at_level("WARNING"):
        checked = index_records(FolderSource(d), bs, verify=True, progress=False)
    by_name = lambda ix: {Path(r.path).stem: (r.width, r.height, ix.bucket_of(i)) for i, r in enumerate(ix.records)}  # noqa: E731
    t, c = by_name(trusted), by_name(checked)
    assert c["wrong"][:2] == (40, 128) and c["wrong"][2].height > c["wrong"][2].width
    assert t["wrong"][2].width > t["wrong"][2].height  # what trusting the sidecar would have trained on
    assert "1 images have a wrong size" in caplog.text and "wrong.json" not in caplog.text and "wrong.png" in caplog.text
    assert "round.png" not in caplog.text  # rounding is not a wrong size
