"""What a LoKr network holds: modules, trainable parameters, file size.

Sizes are computed from shapes, so they work for networks on the meta device
(full-size SDXL without memory): data bytes in the save dtype, ``alpha`` as a
4-byte float32, plus the exact safetensors header for the whole-file total.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lokr_trainer.lokr.names import ADAPTER_COMPONENTS
from lokr_trainer.safetensors_io import PlannedTensor, header_bytes, element_size


@dataclass(frozen=True)
class SummaryRow:
    component: str
    factor: str  # "f4 full", "f8 r16", …
    modules: int
    parameters: int
    bytes: int


@dataclass
class LoKrSummary:
    rows: list[SummaryRow]
    dtype: torch.dtype
    header_bytes: int
    modes: dict[str, int] = field(default_factory=dict)  # training forward mode -> module count

    def component(self, component: str) -> SummaryRow:
        rs = [r for r in self.rows if r.component == component]
        return SummaryRow(component, "all", sum(r.modules for r in rs), sum(r.parameters for r in rs), sum(r.bytes for r in rs))

    @property
    def modules(self) -> int:
        return sum(r.modules for r in self.rows)

    @property
    def parameters(self) -> int:
        return sum(r.parameters for r in self.rows)

    @property
    def file_bytes(self) -> int:
        """Exact size of the saved file in ``dtype`` (with the metadata the network writes)."""
        return sum(r.bytes for r in self.rows) + self.header_bytes

    def __str__(self) -> str:
        head = f"{'component':<10} {'factor':<10} {'modules':>8} {'parameters':>14} {'size':>11}"
        lines = [f"LoKr summary (file dtype {str(self.dtype).replace('torch.', '')})", head, "-" * len(head)]
        for comp in ADAPTER_COMPONENTS:
            rs = [r for r in self.rows if r.component == comp]
            if not rs:
                continue
            for r in rs:
                lines.append(f"{r.component:<10} {r.factor:<10} {r.modules:>8} {r.parameters:>14,} {_mb(r.bytes):>11}")
            c = self.component(comp)
            lines.append(f"{comp:<10} {'all':<10} {c.modules:>8} {c.parameters:>14,} {_mb(c.bytes):>11}")
        lines.append("-" * len(head))
        lines.append(f"{'total':<10} {'':<10} {self.modules:>8} {self.parameters:>14,} {_mb(self.file_bytes):>11}")
        if self.modes:
            lines.append("training forward modes: " + ", ".join(f"{m} {n}" for m, n in sorted(self.modes.items())))
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _factor_label(lyco: Any, requested: int) -> str:
    f = "f-1" if requested == -1 else f"f{requested}"
    if lyco.use_w1 and lyco.use_w2:
        return f"{f} full"
    r = lyco.lokr_w2_b.shape[0] if not lyco.use_w2 else lyco.lokr_w1_b.shape[0]
    return f"{f} r{r}"


def summarize(network: Any, dtype: torch.dtype = torch.float16) -> LoKrSummary:
    groups: dict[tuple[str, str], list[int]] = {}
    plan: list[PlannedTensor] = []
    for name, tensors in network.file_tensors().items():
        lyco = network.lokr[name]
        entry = network.entries[name]
        label = _factor_label(lyco, network.settings[name].factor)
        params = sum(p.numel() for p in lyco.parameters() if p.requires_grad)
        nbytes = 0
        for k, t in tensors.items():
            dt = torch.float32 if k == "alpha" else dtype
            nbytes += t.numel() * element_size(dt)
            plan.append(PlannedTensor(f"{name}.{k}", dt, tuple(t.shape)))
        g = groups.setdefault((entry.component, label), [0, 0, 0])
        g[0] += 1
        g[1] += params
        g[2] += nbytes
    order = {c: i for i, c in enumerate(ADAPTER_COMPONENTS)}

    def key(item: tuple[tuple[str, str], list[int]]) -> tuple[int, int, str]:
        (comp, label), _ = item
        f = label.split()[0][1:]
        return order[comp], int(f) if f.lstrip("-").isdigit() else 0, label

    rows = [SummaryRow(c, lab, *v) for (c, lab), v in sorted(groups.items(), key=key)]
    header = len(header_bytes(plan, network.file_metadata()))
    modes: dict[str, int] = {}
    for m in network.forward_modes(training=True).values():
        modes[m] = modes.get(m, 0) + 1
    return LoKrSummary(rows=rows, dtype=dtype, header_bytes=header, modes=modes)
