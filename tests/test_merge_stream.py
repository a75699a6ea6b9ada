"""Tensor sources and the ordered pipeline of the streaming merge."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch
from test_merge_support import files_in, read_all

from lokr_trainer.errors import CheckpointError
from lokr_trainer.merge.stream import DiffusersFolderSource, SafetensorsSource, file_sha256, open_source, ordered_map


def test_safetensors_source_reads_what_safetensors_reads(tiny_sdxl):
    ref, meta = read_all(tiny_sdxl.single_file)
    src = SafetensorsSource(tiny_sdxl.single_file)
    try:
        assert set(src.keys()) == set(ref) and src.metadata == meta
        starts = [src.header.tensors[k].start for k in src.keys()]
        assert starts == sorted(starts)  # on-disk order: sequential reads
        for k in src.keys():
            t = src.read(k)
            assert t.dtype == ref[k].dtype and t.shape == ref[k].shape and torch.equal(t, ref[k]), k
            assert src.meta(k).nbytes == t.numel() * t.element_size()
    finally:
        src.close()


def test_diffusers_folder_source_equals_the_single_file(tiny_sdxl):
    """The folder, converted key by key without diffusers, gives the single file's keys and bits."""
    ref, _ = read_all(tiny_sdxl.single_file)
    src = open_source(tiny_sdxl.diffusers_dir)
    assert isinstance(src, DiffusersFolderSource)
    try:
        assert set(src.keys()) == set(ref)
        for k in src.keys():
            m, t = src.meta(k), src.read(k)
            assert (m.dtype, m.shape) == (ref[k].dtype, tuple(ref[k].shape)), k
            assert t.dtype == ref[k].dtype and t.shape == ref[k].shape, k
            assert torch.equal(t, ref[k]), k  # q/k/v stacking, text_projection transpose, VAE 1x1 convs
        assert src.size_bytes == sum(f.stat().st_size for f in src.files())
    finally:
        src.close()


def test_diffusers_folder_with_fp16_variant_and_missing_parts(tiny_sdxl, tmp_path):
    folder = tmp_path / "variant"
    shutil.copytree(tiny_sdxl.diffusers_dir, folder)
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.fp16.safetensors")
    src = open_source(folder)
    src.close()
    shutil.copy(unet / "diffusion_pytorch_model.fp16.safetensors", unet / "diffusion_pytorch_model.ema.safetensors")
    with pytest.raises(CheckpointError, match="several weight variants"):
        open_source(folder)
    shutil.rmtree(folder / "vae")
    with pytest.raises(CheckpointError, match="vae"):
        open_source(folder)


def test_pickle_and_missing_inputs_are_refused(tmp_path):
    (tmp_path / "m.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickle"):
        open_source(tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match="not found"):
        open_source(tmp_path / "nope.safetensors")


def test_file_sha256(tmp_path):
    import hashlib

    p = tmp_path / "f.bin"
    data = bytes(range(256)) * 5000
    p.write_bytes(data)
    seen = []
    assert file_sha256([p], seen.append, chunk=4096) == hashlib.sha256(data).hexdigest()
    assert sum(seen) == len(data)


def test_ordered_map_keeps_order_and_bounds_memory():
    lock = threading.Lock()
    state = {"inflight": 0, "peak": 0}
    costs = [30, 10, 50, 20, 40, 10, 10, 60, 5, 25] * 3

    def fn(i):
        with lock:
            state["inflight"] += costs[i]
            state["peak"] = max(state["peak"], state["inflight"])
        time.sleep(0.002 * (i % 3))  # finish out of order
        return i

    out = []
    for i in ordered_map(fn, range(len(costs)), cost=lambda i: costs[i], workers=3, max_inflight_bytes=100):
        out.append(i)
        with lock:
            state["inflight"] -= costs[i]  # the caller has taken (and "written") it
    assert out == list(range(len(costs)))
    assert state["peak"] <= 100
    # one item larger than the budget still runs (alone)
    assert list(ordered_map(lambda i: i, [0, 1], cost=lambda i: 1000, workers=2, max_inflight_bytes=10)) == [0, 1]


def test_ordered_map_reraises_in_order_and_stops_on_close():
    started = []

    def fn(i):
        started.append(i)
        if i == 3:
            raise ValueError("boom at 3")
        return i

    got = []
    with pytest.raises(ValueError, match="boom at 3"):
        for x in ordered_map(fn, range(1000), cost=lambda i: 1, workers=2, max_inflight_bytes=4):
            got.append(x)
    assert got == [0, 1, 2]
    assert max(started) < 20  # nothing far ahead was started

    started.clear()
    it = ordered_map(fn, range(4, 1000), cost=lambda i: 1, workers=2, max_inflight_bytes=4)
    assert next(it) == 4
    it.close()
    n = len(started)
    time.sleep(0.05)
    assert len(started) == n and n < 20  # closed: no further work


@pytest.mark.parametrize("mode", ["direct", "buffered", "refused_at_write"])
def test_write_stream_gives_write_safetensors_bytes(tmp_path, monkeypatch, mode):
    """Direct I/O, buffered, and a file system that refuses O_DIRECT only at write(): same bytes."""
    import errno

    from lokr_trainer.merge import stream
    from lokr_trainer.safetensors_io import PlannedTensor, write_safetensors

    monkeypatch.setattr(stream, "STAGING_BYTES", 64 << 10)  # tensors straddle buffers
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(300, 77, generator=g).half(),
        "b": torch.arange(5, dtype=torch.int64),
        "c": torch.randn(100_000, generator=g),  # > one buffer
        "d": torch.tensor(2.5, dtype=torch.bfloat16),
        "e": torch.empty(0, 3),
    }
    plan = [PlannedTensor(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    meta = {"x": "y"}
    want = write_safetensors(tmp_path / "ref.safetensors", plan, iter(tensors.items()), meta)
    if mode == "buffered":
        monkeypatch.setattr(stream, "_enable_direct", lambda fd: False)
    seen = {"direct": None}
    real_init = stream._StagedFile.__init__

    def init(self, fd, direct=True):
        real_init(self, fd, direct)
        seen["direct"] = self.direct

    monkeypatch.setattr(stream._StagedFile, "__init__", init)
    if mode == "refused_at_write":
        real = stream._write_all

        def refuse_once(fd, view):
            if not seen.get("refused"):
                seen["refused"] = True
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, view)

        monkeypatch.setattr(stream, "_write_all", refuse_once)
    written = []
    got = stream.write_stream(tmp_path / "got.safetensors", plan, iter(tensors.items()), meta, progress=written.append)
    assert got.read_bytes() == want.read_bytes()
    assert written == [v.numel() * v.element_size() for v in tensors.values()]
    assert files_in(tmp_path) == ["got.safetensors", "ref.safetensors"]
    if mode == "buffered":
        assert seen["direct"] is False


def test_write_stream_checks_the_plan(tmp_path):
    from lokr_trainer.merge.stream import write_stream
    from lokr_trainer.safetensors_io import PlannedTensor

    plan = [PlannedTensor("a", torch.float16, (2,)), PlannedTensor("b", torch.float16, (2,))]
    with pytest.raises(CheckpointError, match="does not match the planned"):
        write_stream(tmp_path / "o.safetensors", plan, iter([("a", torch.zeros(2, dtype=torch.float16)), ("b", torch.zeros(3))]))
    with pytest.raises(CheckpointError, match="ran out of tensors"):
        write_stream(tmp_path / "o.safetensors", plan, iter([("a", torch.zeros(2, dtype=torch.float16))]))
    assert files_in(tmp_path) == []


def test_write_stream_interrupted_leaves_nothing(tmp_path):
    """Ctrl-C while tensors are coming: the temporary file goes, nothing is renamed into place."""
    from lokr_trainer.merge.stream import write_stream
    from lokr_trainer.safetensors_io import PlannedTensor

    plan = [PlannedTensor(f"t{i}", torch.float32, (1000,)) for i in range(5)]

    def tensors():
        for i in range(5):
            if i == 3:
                raise KeyboardInterrupt
            yield f"t{i}", torch.zeros(1000)

    with pytest.raises(KeyboardInterrupt):
        write_stream(tmp_path / "o.safetensors", plan, tensors())
    assert files_in(tmp_path) == []


def test_sharded_diffusers_folder(tiny_sdxl, tmp_path):
    """A UNet split into shards with an index file reads like the single file."""
    import json

    from test_merge_support import write_file

    folder = tmp_path / "sharded"
    shutil.copytree(tiny_sdxl.diffusers_dir, folder)
    unet = folder / "unet"
    tensors, _ = read_all(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for shard, keys in shards.items():
        write_file(unet / shard, {k: tensors[k] for k in keys})
        weight_map.update({k: shard for k in keys})
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ref, _ = read_all(tiny_sdxl.single_file)
    src = open_source(folder)
    try:
        assert len(src.files()) == 5 and set(src.keys()) == set(ref)
        assert all(torch.equal(src.read(k), ref[k]) for k in ref)
    finally:
        src.close()
