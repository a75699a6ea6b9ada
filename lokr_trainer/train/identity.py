"""Digests that identify a run's inputs: the base model's bytes and the indexed data set.

They go into every adapter's metadata (which base and which data made it)
and into the training state, so that a resume on another base or data set
is refused instead of silently mixing two runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

from tqdm.auto import tqdm

from lokr_trainer.data.records import SampleRecord

_CHUNK = 8 << 20


def _weight_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".ckpt", ".json"))
    return [path]


def model_sha256(path: str | Path, memo_dir: str | Path | None = None, progress: bool = True) -> str:
    """SHA-256 of a checkpoint file (or of a diffusers folder's files, in name order).

    Hashing 7 GB takes a few seconds; the result is memoised in
    ``memo_dir/base_model_sha256.json`` by path, size and mtime, so a resumed
    run does not pay it again.
    """
    path = Path(path).resolve()
    files = _weight_files(path)
    stamp = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    memo = Path(memo_dir) / "base_model_sha256.json" if memo_dir is not None else None
    if memo is not None and memo.is_file():
        try:
            saved = json.loads(memo.read_text())
            if saved.get("stamp") == stamp:
                return str(saved["sha256"])
        except (OSError, ValueError, KeyError):
            pass
    h = hashlib.sha256()
    total = sum(s[1] for s in stamp)
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing base model", disable=not progress or total < 1 << 28) as bar:
        for f in files:
            if len(files) > 1:
                h.update(f.relative_to(path).as_posix().encode() + b"\0")
            with open(f, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    h.update(chunk)
                    bar.update(len(chunk))
    digest = h.hexdigest()
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        # every rank writes the memo; on a shared disk two nodes' ranks can have the same pid,
        # so the temp name must be unique across hosts, not only per process
        fd, tmp = tempfile.mkstemp(prefix=f".{memo.name}.", suffix=".tmp", dir=memo.parent)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"stamp": stamp, "sha256": digest}))
        os.replace(tmp, memo)
    return digest


def data_digest(records: Iterable[SampleRecord]) -> str:
    """SHA-256 over every record's identity and caption inputs (not the image bytes).

    Changes when an image is added, removed, resized or re-tagged, which is
    what changes the sample order and the captions of a run.
    """
    h = hashlib.sha256()
    for r in records:
        row = [r.key, r.width, r.height, r.tags, r.head, r.rating, r.fav_count, r.year, r.caption]
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()
