"""Helpers shared by the merge tests (no tests here).

The LoKr delta below is the test's own implementation of DESIGN.md §4, the
independent oracle the merge's results are checked against; LoKr files are
written with ``safetensors`` directly, in the tensor layout of §4.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def read_all(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the metadata of a file, through the safetensors library (independent reader)."""
    out = {}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            out[k] = f.get_tensor(k).clone()
    return out, meta


def write_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return Path(path)


def perturbed(src: str | Path, dst: str | Path, seed: int, scale: float = 0.05, dtype: torch.dtype | None = None) -> Path:
    """A second checkpoint with the same keys: every float tensor plus seeded noise (ints untouched)."""
    tensors, meta = read_all(src)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in tensors.items():
        if t.is_floating_point() and not k.endswith("logit_scale"):
            t = t.float() + scale * torch.randn(t.shape, generator=g)
            t = t.to(dtype or tensors[k].dtype)
        out[k] = t
    return write_file(dst, out, meta)


def oracle_delta(t: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """DESIGN.md §4: ΔW = s·kron(W1, W2) reshaped to the weight shape; s = alpha/r if a factor is decomposed."""
    f = {k: v.double() for k, v in t.items()}
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    elif "lokr_t2" in f:  # Tucker: w2[p, r, ...] = Σ t2[i, j, ...] w2_a[i, p] w2_b[j, r]
        w2 = torch.einsum("ijkl,ip,jr->prkl", f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    else:
        w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    delta = torch.kron(w1.contiguous(), w2.contiguous())
    if "lokr_w2_b" in f:
        rank = f["lokr_w2_b"].shape[0]
    elif "lokr_w1_b" in f:
        rank = f["lokr_w1_b"].shape[0]
    else:
        rank = None
    s = float(f["alpha"]) / rank if rank is not None else 1.0
    return (delta * s).reshape(shape)


def lokr_module(shape: tuple[int, ...], gen: torch.Generator, *, f: int = 2, mode: str = "full",
                rank: int = 2, alpha: float = 1.0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random LoKr tensors for a weight of ``shape``.

    mode: ``full`` (w1, w2 full), ``w2_lowrank`` (w2 = w2_a @ w2_b; conv kernel flattened into w2_b),
    ``both_lowrank`` (w1 and w2 decomposed), ``tucker`` (conv only).
    """
    out_dim, in_dim = shape[0], shape[1]
    k = tuple(shape[2:])
    fo, fi = f, (f if in_dim % f == 0 else 1)
    a, b = out_dim // fo, in_dim // fi

    def r(*s: int) -> torch.Tensor:
        return (torch.randn(s, generator=gen) * 0.1).to(dtype)

    t: dict[str, torch.Tensor] = {"alpha": torch.tensor(float(alpha), dtype=torch.float32)}
    if mode == "both_lowrank":
        t["lokr_w1_a"], t["lokr_w1_b"] = r(fo, 1), r(1, fi)
    else:
        t["lokr_w1"] = r(fo, fi)
    if mode == "full":
        t["lokr_w2"] = r(a, b, *k)
    elif mode == "tucker":
        t["lokr_t2"] = r(rank, rank, *k)
        t["lokr_w2_a"] = r(rank, a)
        t["lokr_w2_b"] = r(rank, b)
    else:
        t["lokr_w2_a"] = r(a, rank)
        t["lokr_w2_b"] = r(rank, b * math.prod(k))
    return t


def write_lokr_file(path: str | Path, modules: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> Path:
    tensors = {f"{name}.{tn}": v for name, ts in modules.items() for tn, v in ts.items()}
    meta = {"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sdxl_base_v1-0", **(metadata or {})}
    return write_file(path, tensors, meta)


def assert_rounded_once(out: torch.Tensor, oracle: torch.Tensor, *, tol: float = 1e-6, what: str = "") -> None:
    """``out`` is the fp32 ``oracle`` rounded once to out's dtype, up to fp32 noise in ΔW.

    The merge may round ΔW's fp32 arithmetic differently from the oracle (an
    implementation may scale before or after the kron, sum a low-rank product
    in another order), so its fp32 value may differ by a few fp32 ulps.  For an
    fp32 output that is the tolerance; for fp16/bf16 every element must be the
    oracle rounded to nearest, except where the oracle lies within that noise
    of a rounding tie, where the neighbour is accepted.  Double rounding
    (through another 16-bit type, or rounding W before adding ΔW) fails this.
    """
    oracle = oracle.float()
    assert out.shape == oracle.shape, f"{what}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, oracle, rtol=tol, atol=tol * 0.1, msg=lambda m: f"{what}: {m}")
        return
    want = oracle.to(out.dtype)
    diff = want != out
    if not diff.any():
        return
    o, w, g = oracle[diff].double(), want[diff].double(), out[diff].double()
    mid = (w + g) / 2
    near_tie = (o - mid).abs() <= tol * o.abs().clamp_min(1.0)
    one_step = torch.nextafter(w.to(out.dtype), g.to(out.dtype)).double() == g
    ok = near_tie & one_step
    assert bool(ok.all()), (
        f"{what}: {int((~ok).sum())} of {out.numel()} elements are not the oracle rounded once "
        f"(got {g[~ok][:3].tolist()}, want {w[~ok][:3].tolist()})"
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, for bit-identity checks (-0.0 != 0.0, nan == same nan)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def files_in(folder: str | Path) -> list[str]:
    return sorted(os.listdir(folder))
