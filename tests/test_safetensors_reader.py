"""The one reader (``safetensors_io.read_header``) is at least as strict as the safetensors package."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from lokr_trainer.errors import CheckpointError, CorruptFileError
from lokr_trainer.safetensors_io import SafetensorsReader, read_header, save_tensors


def craft(path, header, data: bytes = b"") -> str:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def f32(shape, begin):
    n = 4
    for d in shape:
        n *= d
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, begin + n]}


def test_files_of_the_reference_implementation_and_ours_read_both_ways(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.zeros(0, 2)}
    save_file(t, str(tmp_path / "ref.safetensors"), {"k": "v"})
    with SafetensorsReader(tmp_path / "ref.safetensors") as r:
        assert all(torch.equal(r.get(k), v) for k, v in t.items()) and r.header.metadata == {"k": "v"}
    ours = save_tensors(tmp_path / "ours.safetensors", t, {"k": "v"})
    back = load_file(str(ours))
    assert all(torch.equal(back[k], v) for k, v in t.items())


@pytest.mark.parametrize(
    "header,data,message",
    [
        ({"a": f32((2,), 0), "b": f32((2,), 0)}, bytes(8), "overlaps"),  # aliasing entries
        ({"a": f32((2,), 0), "b": f32((2,), 12)}, bytes(20), "unused bytes"),
        ({"a": f32((2,), 0)}, bytes(12), "bytes after the last"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4), "shape"),
        ({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, bytes(4), "shape"),
        ({"a": {"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]}}, bytes(4), "shape"),
        ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4), "shape"),
        ({"a": {"dtype": "F32", "shape": [2**63], "data_offsets": [0, 4]}}, bytes(4), "shape"),
        ({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, bytes(4), "int64"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4]}}, bytes(4), "data_offsets"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, bytes(4), "bytes stored"),
        ({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, bytes(4), "invalid header entry"),
        ({"__metadata__": {"k": 1}, "a": f32((1,), 0)}, bytes(4), "__metadata__"),
    ],
)
def test_malformed_headers_are_refused_before_any_allocation(tmp_path, header, data, message):
    with pytest.raises(CorruptFileError, match=message):
        read_header(craft(tmp_path / "bad.safetensors", header, data))


@pytest.mark.parametrize(
    "raw,message",
    [
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "twice"),
        (b'{"__metadata__": {}, "__metadata__": {}}', "twice"),
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, Infinity]}}', "Infinity"),
        (b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', "NaN"),
        (b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested too deeply"),
    ],
)
def test_json_the_reference_refuses_is_refused(tmp_path, raw, message):
    with pytest.raises(CorruptFileError, match=message):
        read_header(craft(tmp_path / "bad.safetensors", raw, bytes(4)))


def test_thousands_of_aliasing_entries_cannot_multiply_memory(tmp_path):
    header = {f"t{i}": f32((1024, 1024), 0) for i in range(3000)}  # all claim the same 4 MiB
    path = craft(tmp_path / "alias.safetensors", header, bytes(4 * 1024 * 1024))
    with pytest.raises(CorruptFileError, match="overlaps"):
        read_header(path)


def test_a_header_over_the_cap_says_the_cap_is_the_reason(tmp_path):
    path = tmp_path / "huge_header.safetensors"
    n = 200 * 1024 * 1024
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n))
        f.truncate(8 + n + 16)  # sparse: big enough on paper, costs nothing
    with pytest.raises(CorruptFileError, match="limit for headers"):
        read_header(path)


def test_not_a_regular_file_gets_its_own_message(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    broken = tmp_path / "broken.safetensors"
    broken.symlink_to(tmp_path / "gone.safetensors")
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    cases = {fifo: "FIFO", loop: "symbolic link loop", broken: "broken symbolic link", folder: "is a folder",
             tmp_path / "missing.safetensors": "file not found", "/dev/null": "character device"}
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            read_header(path)
