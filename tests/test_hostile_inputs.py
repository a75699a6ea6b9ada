"""A corpus of hostile safetensors files, generated here, against every reader entry point.

Each file must be refused by every entry (the raw reader, the cache reader,
``load_sdxl``, ``load_lokr``, ``attach_lokr_from_file``, the merge as base and
as LoKr) with a ``LokrTrainerError`` that names the file, and by the reference
``safetensors`` package too, so our reader is never the more lenient one.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from safetensors import safe_open

from lokr_trainer.errors import LokrTrainerError

F32_4 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}


def _t(shape, begin, dtype="F32", size=4):
    n = size
    for d in shape:
        n *= d
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, begin + n]}


#: name -> (raw header bytes, data bytes)
CORPUS: dict[str, tuple[bytes, bytes]] = {
    "aliasing": (json.dumps({"a": _t((2,), 0), "b": _t((2,), 0)}).encode(), bytes(8)),
    "out_of_order": (json.dumps({"a": _t((2,), 8), "b": _t((2,), 0), "c": _t((2,), 4)}).encode(), bytes(16)),
    "gap": (json.dumps({"a": _t((2,), 0), "b": _t((2,), 12)}).encode(), bytes(20)),
    "trailing_bytes": (json.dumps({"a": _t((2,), 0)}).encode(), bytes(12)),
    "truncated_data": (json.dumps({"a": _t((4,), 0)}).encode(), bytes(8)),
    "duplicate_key": (b'{"a": ' + json.dumps(F32_4).encode() + b', "a": ' + json.dumps(F32_4).encode() + b"}", bytes(4)),
    "duplicate_metadata": (b'{"__metadata__": {}, "__metadata__": {}, "a": ' + json.dumps(F32_4).encode() + b"}", bytes(4)),
    "negative_dim": (json.dumps({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}).encode(), bytes(4)),
    "float_dim": (json.dumps({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}).encode(), bytes(4)),
    "string_dim": (json.dumps({"a": {"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]}}).encode(), bytes(4)),
    "bool_dim": (json.dumps({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}).encode(), bytes(4)),
    "float_offset": (json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4]}}).encode(), bytes(4)),
    "infinity": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, Infinity]}}', bytes(4)),
    "beyond_int64": (json.dumps({"a": {"dtype": "F32", "shape": [2**64], "data_offsets": [0, 4]}}).encode(), bytes(4)),
    "size_overflow": (json.dumps({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}).encode(), bytes(4)),
    "deep_nesting": (b'{"a": ' + b"[" * 50000 + b"]" * 50000 + b"}", bytes(4)),
    "metadata_not_strings": (json.dumps({"__metadata__": {"k": 1}, "a": F32_4}).encode(), bytes(4)),
    "unknown_dtype": (json.dumps({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}).encode(), bytes(4)),
    "not_json": (b"this is not json at all!", bytes(4)),
    "header_not_an_object": (b"[1, 2, 3]", bytes(4)),
    "header_longer_than_file": (b"", b""),  # written specially below
    "empty_file": (b"", b""),  # written specially below
}


def write_corpus_file(path, name: str) -> str:
    if name == "empty_file":
        path.write_bytes(b"")
    elif name == "header_longer_than_file":
        path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    else:
        raw, data = CORPUS[name]
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    return {name: write_corpus_file(d / f"{name}.safetensors", name) for name in CORPUS}


@pytest.fixture(scope="module")
def tiny_models(tiny_sdxl):
    from lokr_trainer.sdxl import load_sdxl

    return load_sdxl(tiny_sdxl.single_file)


def _entries(tiny_sdxl, tiny_models, out_dir):
    from lokr_trainer.lokr import attach_lokr_from_file, load_lokr
    from lokr_trainer.merge import bake_lokr, weighted_sum
    from lokr_trainer.safetensors_io import SafetensorsReader, read_header
    from lokr_trainer.sdxl import load_sdxl

    def reader(p):
        with SafetensorsReader(p) as r:
            return [r.get(k) for k in r.keys()]

    return {
        "read_header": read_header,
        "SafetensorsReader (caches)": reader,
        "load_sdxl": load_sdxl,
        "load_lokr": load_lokr,
        "attach_lokr_from_file": lambda p: attach_lokr_from_file(tiny_models, p),
        "merge base": lambda p: weighted_sum([p], out_dir / "o.safetensors", progress=False),
        "merge lokr": lambda p: bake_lokr(tiny_sdxl.single_file, [p], out_dir / "o.safetensors", progress=False),
    }


def _reference_refuses(path: str) -> bool:
    try:
        with safe_open(path, "pt") as f:
            for k in f.keys():
                f.get_tensor(k)
    except Exception:  # noqa: BLE001 - the reference raises its own types
        return True
    return False


#: Files the reference reads and we refuse on purpose: its JSON parser keeps the last of two equal
#: keys, so a second entry silently replaces the first; issue 10 asks for a refusal.
STRICTER_THAN_REFERENCE = {"duplicate_key"}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_entry_point_refuses_naming_the_file_and_so_does_the_reference(corpus, tiny_sdxl, tiny_models, tmp_path, name):
    path = corpus[name]
    assert _reference_refuses(path) == (name not in STRICTER_THAN_REFERENCE), name
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for entry, run in _entries(tiny_sdxl, tiny_models, out_dir).items():
        with pytest.raises(LokrTrainerError) as e:
            run(path)
        assert path in str(e.value), f"{entry} on {name}: {e.value}"
    assert os.listdir(out_dir) == []


def test_the_aliasing_case_costs_no_memory(tmp_path):
    """3000 entries claiming one 4 MiB range: refused with peak RSS barely above the interpreter's."""
    header = {f"t{i}": _t((1024, 1024), 0) for i in range(3000)}
    raw = json.dumps(header).encode()
    path = tmp_path / "alias.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4 * 1024 * 1024))
    script = textwrap.dedent(f"""
        import resource, sys
        from lokr_trainer.lokr import load_lokr
        from lokr_trainer.errors import LokrTrainerError
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load_lokr({str(path)!r})
        except LokrTrainerError as e:
            print("refused:", str(e), file=sys.stderr)
        print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert "refused:" in out.stderr and "overlaps" in out.stderr
    before, after = map(int, out.stdout.split())
    grown_mib = (after - before) / 1024  # ru_maxrss is in KiB on Linux
    assert grown_mib < 64, f"peak RSS grew by {grown_mib:.0f} MiB on a {path.stat().st_size >> 20} MiB file"


# --------------------------------------------------------------------------- signals during a real merge

_SLOW_MERGE = """
import sys, time
import lokr_trainer.safetensors_io as io
real = io.checked_bytes
def slow(*a, **k):  # the signal must land mid-write: one tensor every 20 ms
    for data in real(*a, **k):
        time.sleep(0.02)
        yield data
io.checked_bytes = slow
import lokr_trainer.merge.stream as stream
if hasattr(stream, "checked_bytes"):
    stream.checked_bytes = slow
from lokr_trainer.merge.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_during_a_merge_leaves_no_temp_and_the_old_output_intact(tiny_sdxl, tmp_path, sig):
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"previous output")
    cmd = [sys.executable, "-c", _SLOW_MERGE, "--base", str(tiny_sdxl.single_file), "--out", str(out),
           "--overwrite", "--no-progress", "--dtype", "fp16", "--workers", "1"]
    signum = getattr(signal, sig)
    # a shell's background job or nohup starts children with SIGINT/SIGHUP ignored (and the writer then
    # rightly leaves them alone); the test models a run started from a terminal
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    time.sleep(0.2)  # well into the tensors
    assert proc.poll() is None, "the merge finished before the signal: slow it down"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.safetensors"], err
    assert out.read_bytes() == b"previous output"
