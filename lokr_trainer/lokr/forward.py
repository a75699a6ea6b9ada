"""Three numerically equivalent LoKr forwards, and the choice between them.

For a layer y = op(x, W) + b with ΔW = s·kron(W1, W2) and multiplier m:

* ``rebuild`` (LyCORIS' default): y = op(x, W) + b + op(x, m·ΔW).  Builds ΔW
  and runs a *second* dense matmul on every call.
* ``bypass`` (LyCORIS' ``bypass_mode``): y = op(x, W) + b + m·s·vec(W2·X·W1ᵀ),
  X = x folded to (in_m, in_n): ΔW is never built; the extra work is two small
  grouped matmuls.  For factor 8 on a 1280×1280 layer that is ~7× fewer MACs
  than the rebuild's second matmul, and it saves nothing of size out×in for
  backward.
* ``merged``: y = op(x, W + m·ΔW) + b: one dense matmul on the merged weight
  (built every call, so gradients reach W1 and W2).  Fastest for inference
  and when the factor is small (big W2), but autograd keeps the merged weight
  of every layer for the backward pass.

The LoKr maths (factors, ΔW, the bypass chain, DoKr) is lycoris-lora's
``LokrModule``; this module only routes a call to one of its paths, adds the
single-matmul merged path built from ``LokrModule.get_weight`` (which applies
the scale once), and picks a mode per layer from a MAC model (:func:`costs`)
calibrated against ``benchmarks/lokr_forward_bench.py``.

Constraints (LyCORIS): ``dropout`` acts on the bypass output only,
``rank_dropout`` drops rows of ΔW (rebuild/merged only), and the bypass path
ignores DoKr's magnitude — so those settings pin the mode.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from lokr_trainer.errors import ConfigError

MODES: tuple[str, ...] = ("bypass", "rebuild", "merged")

#: Memory-bound work of the bypass chain (the transposes/reshapes around the
#: tiny-K matmul with W1, and the scaled add), in dense-MAC equivalents per
#: output element per token for forward + backward.  Fitted on 2 CPU cores
#: with benchmarks/lokr_forward_bench.py (docs/lokr.md): the W1 stage of a
#: 10240x1280 layer costs about as much as its dense matmul.
PASS_COST = 700.0

#: In training, bypass keeps no out×in tensor per layer for backward (merged
#: and rebuild keep one), so it is preferred unless merged is clearly cheaper.
BYPASS_MEMORY_PREFERENCE = 1.1

#: Token count assumed for the T-independent cost of building ΔW.
DEFAULT_TOKENS = 1024


def factor_dims(lyco: Any) -> tuple[int, int, int, int, int]:
    """(a, b, c, d, k): W1 is a×c, W2 is b×d(×k), out = a·b, in = c·d, k = kernel size."""
    out, cin, *kernel = lyco.shape
    k = math.prod(kernel) if kernel else 1
    if lyco.use_w1:
        a, c = lyco.lokr_w1.shape
    else:
        a, c = lyco.lokr_w1_a.shape[0], lyco.lokr_w1_b.shape[1]
    return int(a), int(out // a), int(c), int(cin // c), k


def costs(lyco: Any, tokens: int = DEFAULT_TOKENS, training: bool = True) -> dict[str, float]:
    """Estimated cost of one call in dense multiply-add equivalents (forward, or forward + backward).

    N = out·in·k is the dense layer; the bypass chain costs its two small
    matmuls (W2 on each of the c input groups, then W1 across groups) plus
    :data:`PASS_COST` per output element; building ΔW costs ~N per call
    whatever the token count T.  Backward is ~2x forward for trained paths;
    the frozen base weight only needs the input gradient.
    """
    a, b, c, d, k = factor_dims(lyco)
    n = a * b * c * d * k
    out = a * b
    if lyco.use_w2:
        chain = c * b * d * k
    else:
        r = lyco.lokr_t2.shape[0] if lyco.tucker else lyco.lokr_w2_a.shape[1]
        chain = c * (d * k * r + r * b)
    chain += b * c * a
    build = n / max(tokens, 1)
    if training:
        return {
            "bypass": 2 * n + 3 * chain + PASS_COST * out,
            "rebuild": 5 * n + 3 * build,
            "merged": 3 * n + 3 * build,
        }
    return {"bypass": n + chain + PASS_COST / 3 * out, "rebuild": 2 * n + build, "merged": n + build}


def allowed_modes(lyco: Any) -> tuple[str, ...]:
    """Modes that compute what LyCORIS' training forward computes for this module's settings."""
    modes = list(MODES)
    if getattr(lyco, "wd", False) or getattr(lyco, "rank_dropout", 0):
        modes.remove("bypass")  # bypass skips DoKr and rank dropout
    if isinstance(getattr(lyco, "drop", None), torch.nn.Dropout):
        modes = ["bypass"]  # plain dropout exists on the bypass output only
    return tuple(modes)


def choose_mode(lyco: Any, requested: str, training: bool, tokens: int = DEFAULT_TOKENS) -> str:
    """The mode to run: ``requested`` if explicit (checked), else the cheapest allowed."""
    allowed = allowed_modes(lyco)
    if requested != "auto":
        if requested not in allowed:
            raise ConfigError(
                f"LoKr module {lyco.lora_name}: forward_mode {requested!r} cannot honour its settings "
                f"(dropout works only in bypass; rank_dropout and weight_decompose not in bypass); "
                f"allowed: {', '.join(allowed)}"
            )
        return requested
    c = costs(lyco, tokens, training)
    if training and "bypass" in c:
        c["bypass"] /= BYPASS_MEMORY_PREFERENCE
    return min(allowed, key=lambda m: (c[m], MODES.index(m)))


def _base_weight(lyco: Any) -> torch.Tensor:
    if hasattr(lyco, "_current_weight"):  # lycoris >= 4 (dequantises fp8 weights)
        return lyco._current_weight()
    return lyco.org_module[0].weight.detach()


def merged_weight(lyco: Any) -> torch.Tensor:
    """W + m·ΔW (or LyCORIS' DoKr rescale of W + ΔW), with autograd to the factors."""
    base = _base_weight(lyco)
    # get_weight applies the scale once; dtype handling as LyCORIS' rebuild forward
    diff = lyco.get_weight(lyco.shape).to(device=base.device, dtype=base.dtype) * lyco.scalar
    if lyco.wd:
        return lyco.apply_weight_decompose(base + diff, lyco.multiplier)
    if lyco.multiplier == 1:
        return base + diff
    return base + diff * lyco.multiplier


def merged_forward(lyco: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """One dense op on the merged weight; module dropout as in LyCORIS' forward."""
    if lyco.module_dropout and lyco.training and torch.rand(1) < lyco.module_dropout:
        return lyco.org_forward(x, *args, **kwargs)
    weight = merged_weight(lyco).to(dtype=x.dtype)
    bias = lyco.org_module[0].bias
    if bias is not None:
        bias = bias.detach().to(dtype=x.dtype)
    return lyco.op(x, weight, bias, **lyco.kw_dict)


class LoKrSlot:
    """Replaces one module's ``forward``: base only when disabled, else the chosen LoKr path.

    The adapter's dropouts follow the *wrapped* module's ``train()``/``eval()``
    state, which is what users toggle (``unet.eval()`` for sampling), rather
    than the separate adapter network's.
    """

    def __init__(self, lyco: Any, mode: str, network_state: Any) -> None:
        self.lyco = lyco
        self.requested = mode
        self.state = network_state  # shared: .enabled
        self.auto_train = choose_mode(lyco, mode, training=True)
        self.auto_infer = choose_mode(lyco, mode, training=False)
        self._trainable = lyco.lokr_w1 if lyco.use_w1 else lyco.lokr_w1_a

    def set_mode(self, mode: str) -> None:
        self.auto_train = choose_mode(self.lyco, mode, training=True)
        self.auto_infer = choose_mode(self.lyco, mode, training=False)
        self.requested = mode

    def current_mode(self) -> str:
        """Training cost model when autograd will need the adapter's gradients, else inference."""
        if torch.is_grad_enabled() and self._trainable.requires_grad:
            return self.auto_train
        return self.auto_infer

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        lyco = self.lyco
        if not self.state.enabled:
            return lyco.org_forward(x, *args, **kwargs)
        org = lyco.org_module[0]
        if lyco.training != org.training:
            lyco.train(org.training)
        mode = self.current_mode()
        if mode == "merged":
            return merged_forward(lyco, x, *args, **kwargs)
        lyco.bypass_mode = mode == "bypass"
        return lyco.forward(x, *args, **kwargs)


def install(module: torch.nn.Module, slot: Callable[..., torch.Tensor]) -> None:
    """Route ``module``'s calls through ``slot`` (an instance attribute shadows the class forward)."""
    if isinstance(module.__dict__.get("forward"), LoKrSlot):
        raise ConfigError(
            f"{slot.lyco.lora_name if isinstance(slot, LoKrSlot) else module}: this module already has a LoKr "
            "attached; call network.remove() (or merge_into_models()) on the first network before attaching another"
        )
    if "forward" in module.__dict__:
        module.__dict__["_lokr_prev_forward"] = module.__dict__["forward"]
    module.forward = slot  # type: ignore[method-assign]


def uninstall(module: torch.nn.Module) -> None:
    prev = module.__dict__.pop("_lokr_prev_forward", None)
    module.__dict__.pop("forward", None)
    if prev is not None:
        module.forward = prev  # type: ignore[method-assign]
