"""benchmarks/train_bench.py works: its smoke mode (the tiny model) and the GPU part's no-CUDA branch."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_compares_equivalent_steps(bench, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 OpenMP threads on a busy 2-core machine run ~15x slower
    try:
        result = bench.run_compare(bench.parse_args(["--smoke"]))
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    check = result["check"]
    # same weights, same inputs: auto vs rebuild forward, cached vs per-step VAE latents
    assert set(check["loss"]) == {"ours", "reference", "rebuild, cached"}
    assert check["loss_diff"] <= 1e-5
    assert check["grad_max"] > 0 and check["grad_rel_diff"] <= 1e-4
    assert math.isfinite(result["ratio"]) and result["ratio"] > 0
    assert all(len(t) == 1 and t[0] > 0 for t in result["times"].values())
    assert sum(result["modes"].values()) == result["modules"] > 0  # auto picked a mode for every module
    assert "ratio ours/reference = " in out and "forward-mode effect alone" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the GPU part really runs (minutes)")
def test_gpu_part_without_cuda(bench, capsys):
    assert bench.main(["--part", "gpu"]) == 0
    assert "GPU part: not measured (no CUDA device)" in capsys.readouterr().out
