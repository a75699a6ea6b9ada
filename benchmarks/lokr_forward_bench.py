"""Time LoKr forward modes on a full-size SDXL transformer block (forward + backward).

One ``BasicTransformerBlock`` as SDXL's deepest level has it (1280 channels,
20 heads of 64, cross-attention on a 2048-d, 77-token context, GEGLU
feed-forward), batch 1 at a 32x32 latent (1024 tokens; 128x128 latents at
1024² put 1024 tokens in SDXL's 1280-channel level).  Every Linear of the block
(attn1/attn2 q, k, v, out, ff in/out) gets a full-matrix LoKr with non-zero
factors; each forward mode (bypass, rebuild, merged, and ``auto``, our
per-layer choice) is timed for a training step (forward + backward of
sum(out), input requiring grad) and for an inference forward, next to the
plain block.  A second table times single layers, which is what the ``auto``
cost model in ``lokr_trainer.lokr.forward`` is calibrated on.

    python benchmarks/lokr_forward_bench.py [--factors 2 4 8] [--repeat 2] [--threads 2] [--device cpu] [--layers]

CPU figures are ratios on this machine's cores; GPU needs ``--device cuda``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from lokr_trainer.lokr import forward as fwd


class _State:
    enabled = True


def _wrap(block: nn.Module, factor: int, state: _State, dtype: torch.dtype) -> list:
    """Full-matrix LoKr with random non-zero factors on every Linear of ``block``."""
    from lycoris.modules.lokr import LokrModule

    slots = []
    g = torch.Generator().manual_seed(0)
    for name, module in block.named_modules():
        if type(module) is not nn.Linear:
            continue
        device = module.weight.device
        with torch.device(device):
            lyco = LokrModule(name, module, lora_dim=1, alpha=1, factor=factor, full_matrix=True, bypass_mode=False)
        with torch.no_grad():
            for p in lyco.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
                p.data = p.data.to(device=device, dtype=dtype)
        slot = fwd.LoKrSlot(lyco, "auto", state)
        fwd.install(module, slot)
        slots.append((module, slot))
    return slots


def _unwrap(slots: list) -> None:
    for module, _ in slots:
        fwd.uninstall(module)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _interleaved(setups: dict, fn, repeat: int, device: str) -> dict[str, float]:
    """Best time per setup, running the setups round-robin so that a busy spell on a
    shared machine hits all of them alike (ratios stay meaningful)."""
    best = {k: float("inf") for k in setups}
    for rnd in range(repeat + 1):  # round 0 warms up
        for name, setup in setups.items():
            setup()
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            if rnd:
                best[name] = min(best[name], time.perf_counter() - t)
    return best


def block_table(args: argparse.Namespace) -> None:
    from diffusers.models.attention import BasicTransformerBlock

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    block = BasicTransformerBlock(
        dim=1280, num_attention_heads=20, attention_head_dim=64, cross_attention_dim=2048, activation_fn="geglu"
    ).to(args.device, dtype)
    block.requires_grad_(False)
    tokens = args.latent * args.latent
    x = torch.randn(1, tokens, 1280, device=args.device, dtype=dtype, requires_grad=True)
    ctx = torch.randn(1, 77, 2048, device=args.device, dtype=dtype)

    def train():
        x.grad = None
        block(x, encoder_hidden_states=ctx).float().sum().backward()

    def infer():
        with torch.no_grad():
            block(x, encoder_hidden_states=ctx)

    print(f"\nSDXL transformer block, 1280 ch, {tokens} tokens, context 77x2048, {args.dtype}, {args.device}")
    print("times: best of interleaved runs; ratios against the plain block and LyCORIS' default (rebuild)")
    print(f"{'factor':>6} {'mode':>8} {'train ms':>9} {'x plain':>8} {'x rebuild':>10} {'infer ms':>9} {'x plain':>8} {'x rebuild':>10}")
    for factor in args.factors:
        state = _State()
        slots = _wrap(block, factor, state, dtype)
        try:
            setups = {}

            def plain():
                state.enabled = False

            setups["plain"] = plain
            for mode in ("rebuild", "bypass", "merged", "auto"):

                def setup(mode=mode):
                    state.enabled = True
                    for _, slot in slots:
                        slot.set_mode(mode)

                setups[mode] = setup
            tr = _interleaved(setups, train, args.repeat, args.device)
            inf = _interleaved(setups, infer, args.repeat, args.device)
            for _, slot in slots:
                slot.set_mode("auto")
            picks = "/".join(sorted({slot.auto_train for _, slot in slots}))
        finally:
            _unwrap(slots)
        for mode in setups:
            note = f"  (train picks {picks})" if mode == "auto" else ""
            print(
                f"{factor:>6} {mode:>8} {tr[mode] * 1e3:>9.0f} {tr[mode] / tr['plain']:>8.2f} {tr[mode] / tr['rebuild']:>10.2f} "
                f"{inf[mode] * 1e3:>9.0f} {inf[mode] / inf['plain']:>8.2f} {inf[mode] / inf['rebuild']:>10.2f}{note}"
            )


def layer_table(args: argparse.Namespace) -> None:
    from lycoris.modules.lokr import LokrModule

    dtype = getattr(torch, args.dtype)
    tokens = args.latent * args.latent
    print(f"\nsingle layers, {tokens} tokens: train ms (fwd+bwd) per mode; model = cost-model choice")
    print(f"{'layer':>22} {'f':>3} {'bypass':>8} {'rebuild':>8} {'merged':>8} {'fastest':>8} {'model':>8}")
    shapes = [("linear", 1280, 1280), ("linear", 10240, 1280), ("linear", 1280, 5120), ("conv3x3", 1280, 1280)]
    for kind, out, cin in shapes:
        if kind == "linear":
            base = nn.Linear(cin, out).to(args.device, dtype)
            x = torch.randn(tokens, cin, device=args.device, dtype=dtype, requires_grad=True)
        else:
            base = nn.Conv2d(cin, out, 3, padding=1).to(args.device, dtype)
            x = torch.randn(1, cin, args.latent, args.latent, device=args.device, dtype=dtype, requires_grad=True)
        base.requires_grad_(False)
        for factor in args.factors:
            with torch.device(args.device):
                lyco = LokrModule("m", base, lora_dim=1, alpha=1, factor=factor, full_matrix=True)
            with torch.no_grad():
                for p in lyco.parameters():
                    p.normal_(0, 0.01)
            slot = fwd.LoKrSlot(lyco, "auto", _State())
            setups = {m: (lambda m=m: slot.set_mode(m)) for m in fwd.MODES}

            def step():
                x.grad = None
                slot(x).float().sum().backward()

            times = _interleaved(setups, step, args.repeat, args.device)
            model = fwd.choose_mode(lyco, "auto", training=True, tokens=tokens)
            fastest = min(times, key=times.get)
            print(
                f"{kind + f' {out}x{cin}':>22} {factor:>3} {times['bypass'] * 1e3:>8.1f} {times['rebuild'] * 1e3:>8.1f} "
                f"{times['merged'] * 1e3:>8.1f} {fastest:>8} {model:>8}"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--factors", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--latent", type=int, default=32, help="latent side: tokens = latent²")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--layers", action="store_true", help="also time single layers (cost-model calibration)")
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    block_table(args)
    if args.layers:
        layer_table(args)


if __name__ == "__main__":
    main()
