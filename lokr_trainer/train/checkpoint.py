"""Training states: written atomically, found, validated and loaded for an exact resume.

A state is a folder ``state/step-000500/`` with the adapter weights (fp32,
never the frozen base), the optimizer, scheduler and grad-scaler states, the
RNG states and ``trainer.json`` (position, counters and the run-defining
config).  It is written into ``state/.step-000500.tmp-<pid>/``, every file
fsynced, then renamed into place, so a kill during a save leaves the previous
state loadable and never a half-written one under a real name.  Only the
last ``keep_last`` states are kept.  Tensors are read back with
``torch.load(weights_only=True)`` or safetensors, never with pickle.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from lokr_trainer.errors import CheckpointError, ConfigError
from lokr_trainer.safetensors_io import SafetensorsReader, fsync_dir, pid_alive, save_tensors

logger = logging.getLogger(__name__)

STATE_DIR = "state"
FORMAT = "lokr_trainer.state/1"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def rng_state() -> dict[str, Any]:
    """Global RNG states (python, numpy, torch) as plain tensors and numbers (``weights_only`` loads them).

    Our own draws never use them (they are seeded per sample); LoKr module
    dropout and user code may.
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def save_state(
    root: str | Path,
    step: int,
    *,
    adapter: Mapping[str, torch.Tensor],
    optimizer: Mapping[str, Any],
    scheduler: Mapping[str, Any],
    scaler: Mapping[str, Any] | None,
    trainer: Mapping[str, Any],
    keep_last: int,
) -> Path:
    """Write one state atomically and prune old ones; returns the final folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_tensors(tmp / "adapter.safetensors", {k: v.detach().to(torch.float32) for k, v in adapter.items()}, clean_stale=False)
        torch.save(dict(optimizer), tmp / "optimizer.pt")
        torch.save({"scheduler": dict(scheduler), "scaler": None if scaler is None else dict(scaler), "rng": rng_state()}, tmp / "misc.pt")
        (tmp / "trainer.json").write_text(json.dumps({"format": FORMAT, **trainer}, indent=1, sort_keys=True))
        for p in tmp.iterdir():
            _fsync_file(p)
        fsync_dir(tmp)
        if final.exists():  # a state of the same step (a rerun after stop_after): replace it
            old = root / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_states(root, keep_last)
    return final


def list_states(root: str | Path) -> list[tuple[int, Path]]:
    """Complete states under ``root`` (``trainer.json`` present), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "trainer.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def prune_states(root: str | Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` states; remove leftovers of interrupted saves."""
    root = Path(root)
    states = list_states(root)
    for _, p in states[: max(0, len(states) - max(1, keep_last))]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".step-*.tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not pid_alive(pid):  # a crashed save, by the rule the file writer uses
            shutil.rmtree(p, ignore_errors=True)


def resolve_resume(spec: str, output_dir: str | Path) -> Path:
    """``latest`` → newest state under ``<output_dir>/state``; a path → that state (or its newest)."""
    if spec == "latest":
        states = list_states(Path(output_dir) / STATE_DIR)
        if not states:
            raise CheckpointError(
                Path(output_dir) / STATE_DIR,
                "no training state to resume from",
                "train without --resume first, or point --resume at a state folder",
            )
        return states[-1][1]
    p = Path(spec)
    if (p / "trainer.json").is_file():
        return p
    for candidate in (p / STATE_DIR, p):
        states = list_states(candidate)
        if states:
            return states[-1][1]
    raise CheckpointError(p, "not a training state folder (no trainer.json) and holds none", "pass latest or a state/step-NNNNNN folder")


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a state folder; a missing or unreadable part is a CheckpointError naming it."""
    path = Path(path)
    try:
        trainer = json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(path / "trainer.json", f"unreadable training state ({e})") from None
    if trainer.get("format") != FORMAT:
        raise CheckpointError(path, f"unknown state format {trainer.get('format')!r}, expected {FORMAT!r}")
    try:
        with SafetensorsReader(path / "adapter.safetensors") as reader:
            adapter = {k: reader.get(k) for k in reader.keys()}
        optimizer = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        misc = torch.load(path / "misc.pt", weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any damage means this state cannot be used
        raise CheckpointError(path, f"damaged training state ({type(e).__name__}: {e})", "resume from an older state folder") from None
    return {"trainer": trainer, "adapter": adapter, "optimizer": optimizer, **misc}


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose run-defining values differ, as ``key: saved -> current`` lines."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<unset>"), current.get(k, "<unset>")
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


def check_resume_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], where: Path) -> None:
    diffs = config_differences(saved, current)
    if diffs:
        raise ConfigError(
            f"cannot resume from {where}: the config differs in what defines the run ("
            + "; ".join(diffs)
            + "); resume with the original settings or start a new output_dir"
        )
