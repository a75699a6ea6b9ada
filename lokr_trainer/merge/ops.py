"""The arithmetic of one output tensor: weighted sum, LoKr deltas, one rounding.

DESIGN.md §5: W = Σ wᵢ·Wᵢ, then (restore), then W' = W + Σ mⱼ·ΔWⱼ, all in
fp32, rounded once to the output dtype.  The result is bit-for-bit what
these torch expressions give on whole fp32 tensors, evaluated left to right::

    acc = W0.float() * w0 + W1.float() * w1 + ...        # or W0.float() when not summing
    acc = acc + dW1 * m1 + dW2 * m2 + ...                # dW·1 is skipped (exact)
    out = acc.to(out_dtype)

but computed in slices of ``CHUNK`` elements so the fp32 working set stays
in cache and no fp32 copy of a whole tensor is ever made (TE2's token
embedding alone is 253 MB in fp32).  Only plain multiplies and adds are used,
never ``add(alpha=)``, which may fuse into an FMA and round differently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

#: Elements per slice: 256 K fp32 = 1 MiB, a few of which fit in L2.
CHUNK = 1 << 18


@dataclass(frozen=True)
class Delta:
    """``m·ΔW`` to add at flat element offset ``offset`` of the output (q/k/v row slices)."""

    delta: torch.Tensor  # fp32, contiguous; flattened here
    multiplier: float
    offset: int = 0


class NonFiniteResult(ArithmeticError):
    """Raised by :func:`combine` with the count and first flat index of bad values."""

    def __init__(self, count: int, first_index: int) -> None:
        self.count = count
        self.first_index = first_index
        super().__init__(f"{count} non-finite values (first at flat index {first_index})")


def combine(
    inputs: Sequence[torch.Tensor],
    weights: Sequence[float] | None,
    deltas: Sequence[Delta],
    out_dtype: torch.dtype,
    *,
    check_finite: bool = True,
) -> torch.Tensor:
    """``(Σ wᵢ·inputsᵢ or inputs[0]) + Σ mⱼ·ΔWⱼ`` in fp32, rounded once to ``out_dtype``.

    ``weights=None`` takes ``inputs[0]`` as it is (a LoKr bake or a cast);
    otherwise ``len(weights) == len(inputs)``.  All inputs share one shape;
    deltas are flat fp32 ranges inside it.  Raises :class:`NonFiniteResult`
    if any output element is inf or nan.
    """
    if not inputs:
        raise ValueError("combine needs at least one input tensor")
    shape = tuple(inputs[0].shape)
    flat = [t.reshape(-1) for t in inputs]
    n = flat[0].numel()
    if any(f.numel() != n for f in flat):
        raise ValueError("combine: inputs differ in size")
    if weights is not None and len(weights) != len(inputs):
        raise ValueError("combine: one weight per input")
    dflat = [(d.delta.reshape(-1), float(d.multiplier), int(d.offset)) for d in deltas]
    for dv, _, off in dflat:
        if dv.dtype != torch.float32 or off < 0 or off + dv.numel() > n:
            raise ValueError("combine: a delta must be fp32 and lie inside the output")

    out = torch.empty(n, dtype=out_dtype)
    direct = out_dtype == torch.float32
    step = min(CHUNK, max(n, 1))
    acc_buf = None if direct else torch.empty(step, dtype=torch.float32)
    tmp_buf = torch.empty(step, dtype=torch.float32) if (len(flat) > 1 or dflat) else None
    bad = 0
    first_bad = -1
    for s in range(0, n, step):
        e = min(n, s + step)
        k = e - s
        res = out[s:e]
        covering = [(dv, m, off) for dv, m, off in dflat if off < e and s < off + dv.numel()]
        if weights is None and len(covering) == 1 and covering[0][2] <= s and e <= covering[0][2] + covering[0][0].numel():
            # The common bake case, one pass: x (any float dtype) + m·ΔW computed in fp32
            # (fp16 + fp32 promotes to fp32), stored with one rounding to out_dtype.
            dv, m, off = covering[0]
            seg = dv[s - off : e - off]
            if m != 1.0:
                tmp = tmp_buf[:k]  # type: ignore[index]
                torch.mul(seg, m, out=tmp)
                seg = tmp
            torch.add(flat[0][s:e], seg, out=res)
            if check_finite:
                bad, first_bad = _count_non_finite(res, s, bad, first_bad)
            continue
        acc = res if direct else acc_buf[:k]  # type: ignore[index]
        acc.copy_(flat[0][s:e])
        if weights is not None:
            acc.mul_(weights[0])
            for x, w in zip(flat[1:], weights[1:]):
                tmp = tmp_buf[:k]  # type: ignore[index]
                tmp.copy_(x[s:e])
                tmp.mul_(w)
                acc.add_(tmp)
        for dv, m, off in dflat:
            lo, hi = max(s, off), min(e, off + dv.numel())
            if lo >= hi:
                continue
            seg = dv[lo - off : hi - off]
            if m != 1.0:
                tmp = tmp_buf[: hi - lo]  # type: ignore[index]
                torch.mul(seg, m, out=tmp)
                seg = tmp
            acc[lo - s : hi - s].add_(seg)
        if not direct:
            res.copy_(acc)
        if check_finite:
            bad, first_bad = _count_non_finite(res, s, bad, first_bad)
    if bad:
        raise NonFiniteResult(bad, first_bad)
    return out.reshape(shape)


def _count_non_finite(res: torch.Tensor, start: int, bad: int, first_bad: int) -> tuple[int, int]:
    """Add the inf/nan count of one output slice (and the first one's flat index).

    A sum is non-finite whenever an element is (inf, or nan from inf - inf or a
    nan), and costs 0.06 ns/element against 1.8 for ``isfinite()`` on fp16;
    only a large but finite bf16/fp32 slice can overflow the sum, and the
    exact test then clears it.
    """
    if math.isfinite(float(res.sum())):
        return bad, first_bad
    bad_mask = ~torch.isfinite(res)
    if bad_mask.any():
        if first_bad < 0:
            first_bad = start + int(bad_mask.nonzero()[0, 0])
        bad += int(bad_mask.sum())
    return bad, first_bad


def cast_exact(dtype_from: torch.dtype, dtype_to: torch.dtype) -> bool:
    """Whether every value of ``dtype_from`` survives a cast to ``dtype_to`` unchanged."""
    if dtype_from == dtype_to:
        return True
    exact = {
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float64),
        (torch.bfloat16, torch.float64),
        (torch.float32, torch.float64),
    }
    return (dtype_from, dtype_to) in exact
