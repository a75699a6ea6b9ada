"""Long-prompt encoding for SDXL (up to ``max_tokens`` = 75·n) and SDXL time ids.

DESIGN.md §3.  A prompt's tokens (no BOS/EOS) are cut into windows of 75;
window ``i`` is encoded as ``BOS + tokens[75i:75i+75] + EOS`` padded to 77
with the pad id (TE1: EOS, TE2: ``!`` = 0).  Token ids of both encoders come
from TE1's tokenizer (same BPE vocabulary), so a ``!`` inside a prompt keeps
its ids for TE2 as in OpenCLIP/kohya/ComfyUI/A1111 (diffusers' ``tokenizer_2``
would turn it into the pad id 0).  Both encoders'
penultimate hidden states are concatenated on the feature axis (768 + 1280 =
2048 for SDXL) and the windows are joined on the sequence axis:

* ``kohya``: BOS state of window 0, tokens 1..75 of every window, the last
  state of the last window: ``75·n + 2`` positions (302 for 300 tokens).  For
  one window this is exactly diffusers' ``encode_prompt``.  Kohaku XL was
  trained this way; default.
* ``concat``: every window's 77 states: ``77·n`` positions (308 for 300),
  the A1111/ComfyUI layout.

The pooled embedding is TE2's projected EOS state of window 0 in both
layouts.  With ``dynamic_windows=False`` (default, kohya's behaviour) every
prompt uses ``max_tokens/75`` windows, empty ones being ``BOS EOS pad…``; with
``True`` a batch uses only as many windows as its longest prompt needs.
Tokens beyond ``max_tokens`` are dropped and counted (:attr:`PromptEncoder.truncated`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import torch

from lokr_trainer.errors import ConfigError

logger = logging.getLogger(__name__)

Layout = Literal["kohya", "concat"]
LAYOUTS: tuple[str, ...] = ("kohya", "concat")
WINDOW = 75  # tokens per window, BOS and EOS excluded
CONTEXT = WINDOW + 2


def check_settings(max_tokens: int, layout: str) -> int:
    """Validate ``max_tokens``/``layout``; returns the number of windows."""
    if layout not in LAYOUTS:
        raise ConfigError(f"prompt layout must be one of {LAYOUTS}, got {layout!r}")
    if max_tokens < WINDOW or max_tokens % WINDOW:
        raise ConfigError(
            f"max_tokens must be a positive multiple of {WINDOW} (75, 150, 225, 300, ...), got {max_tokens}"
        )
    return max_tokens // WINDOW


def sequence_length(n_windows: int, layout: str) -> int:
    """Context length the UNet sees for ``n_windows`` windows (kohya 75n+2, concat 77n)."""
    return WINDOW * n_windows + 2 if layout == "kohya" else CONTEXT * n_windows


@dataclass
class TokenWindows:
    """Window token ids of a batch for one tokenizer."""

    ids: torch.Tensor  # (B, n, 77) int64
    n_tokens: list[int]  # tokens per prompt before truncation (BOS/EOS excluded)
    truncated: list[bool]


def tokenize_windows(
    prompts: Sequence[str],
    tokenizer: Any,
    max_tokens: int,
    n_windows: int | None = None,
    pad_id: int | None = None,
) -> TokenWindows:
    """Cut each prompt's tokens into ``BOS + 75 + EOS`` windows padded with ``pad_id``.

    ``n_windows`` fixes the window count (default ``max_tokens / 75``);
    ``pad_id`` defaults to the tokenizer's pad id.
    """
    max_windows = check_settings(max_tokens, "kohya")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = pad_id if pad_id is not None else tokenizer.pad_token_id
    if pad is None:
        pad = eos
    raw = tokenizer(list(prompts), add_special_tokens=False, truncation=False, padding=False, verbose=False)[
        "input_ids"
    ]
    n_tokens = [len(r) for r in raw]
    if n_windows is None:
        n_windows = max_windows
    if not 1 <= n_windows <= max_windows:
        raise ConfigError(f"n_windows must be in [1, {max_windows}], got {n_windows}")
    ids = torch.full((len(raw), n_windows, CONTEXT), pad, dtype=torch.long)
    ids[:, :, 0] = bos
    for b, toks in enumerate(raw):
        toks = toks[: n_windows * WINDOW]
        for w in range(n_windows):
            chunk = toks[w * WINDOW : (w + 1) * WINDOW]
            if chunk:
                ids[b, w, 1 : 1 + len(chunk)] = torch.tensor(chunk, dtype=torch.long)
            ids[b, w, 1 + len(chunk)] = eos
    return TokenWindows(ids, n_tokens, [n > max_tokens for n in n_tokens])


def assemble(states: torch.Tensor, layout: str) -> torch.Tensor:
    """``(B, n, 77, D)`` window states → ``(B, L, D)`` in the given layout."""
    b, n, c, d = states.shape
    if layout == "concat":
        return states.reshape(b, n * c, d)
    if layout == "kohya":
        inner = states[:, :, 1 : 1 + WINDOW].reshape(b, n * WINDOW, d)
        return torch.cat([states[:, 0, :1], inner, states[:, -1, -1:]], dim=1)
    raise ConfigError(f"prompt layout must be one of {LAYOUTS}, got {layout!r}")


def _penultimate(encoder: Any, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
    out = encoder(ids.to(encoder.device), output_hidden_states=True)
    return out.hidden_states[-2], out


@dataclass
class PromptEmbeds:
    """Text conditioning of a batch: ``hidden`` (B, L, D1+D2), ``pooled`` (B, P)."""

    hidden: torch.Tensor
    pooled: torch.Tensor
    n_tokens: list[int]
    truncated: list[bool]


def encode_prompts(
    prompts: Sequence[str],
    tokenizer: Any,
    tokenizer_2: Any,
    text_encoder: Any,
    text_encoder_2: Any,
    max_tokens: int = WINDOW,
    layout: Layout = "kohya",
    dynamic_windows: bool = False,
) -> PromptEmbeds:
    """Encode a batch of prompts with both SDXL text encoders (see module docstring).

    Gradients flow when the encoders require them (trained TE adapters); wrap
    the call in ``torch.no_grad()`` for frozen encoders.
    """
    max_windows = check_settings(max_tokens, layout)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    n = max_windows
    if dynamic_windows:
        longest = max(len(t) for t in tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"])
        n = min(max_windows, max(1, math.ceil(longest / WINDOW)))
    w1 = tokenize_windows(prompts, tokenizer, max_tokens, n)
    # Both encoders share CLIP's BPE vocabulary; only the padding differs.
    # TE2's ids come from TE1's tokenizer padded with TE2's pad id (0, "!"):
    # diffusers' tokenizer_2 makes "!" its pad *token*, so every "!" inside a
    # prompt ("!?", "!!") would become id 0, unlike OpenCLIP, kohya (which
    # trained Kohaku XL), ComfyUI and A1111, where "!" keeps its own ids.
    w2 = tokenize_windows(prompts, tokenizer, max_tokens, n, pad_id=tokenizer_2.pad_token_id)
    b = len(prompts)
    h1, _ = _penultimate(text_encoder, w1.ids.reshape(b * n, CONTEXT))
    h2, out2 = _penultimate(text_encoder_2, w2.ids.reshape(b * n, CONTEXT))
    pooled = out2[0].reshape(b, n, -1)[:, 0]
    states = torch.cat([h1, h2.to(h1.dtype)], dim=-1).reshape(b, n, CONTEXT, -1)
    return PromptEmbeds(assemble(states, layout), pooled, w1.n_tokens, w1.truncated)


class PromptEncoder:
    """Encodes batches with fixed settings and counts truncated prompts for the run summary."""

    def __init__(
        self,
        tokenizer: Any,
        tokenizer_2: Any,
        text_encoder: Any,
        text_encoder_2: Any,
        max_tokens: int = WINDOW,
        layout: Layout = "kohya",
        dynamic_windows: bool = False,
    ) -> None:
        check_settings(max_tokens, layout)
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.max_tokens, self.layout, self.dynamic_windows = max_tokens, layout, dynamic_windows
        self.prompts = 0
        self.truncated = 0
        self.longest = 0

    def __call__(self, prompts: Sequence[str]) -> PromptEmbeds:
        out = encode_prompts(
            prompts,
            self.tokenizer,
            self.tokenizer_2,
            self.text_encoder,
            self.text_encoder_2,
            self.max_tokens,
            self.layout,
            self.dynamic_windows,
        )
        self.prompts += len(out.truncated)
        t = sum(out.truncated)
        if t and not self.truncated:
            logger.warning(
                "%d of %d prompts in this batch have more than max_tokens=%d tokens (longest %d); the excess is "
                "dropped and counted in the summary (raise data.max_tokens, a multiple of 75, to keep it)",
                t,
                len(out.truncated),
                self.max_tokens,
                max(out.n_tokens),
            )
        self.truncated += t
        self.longest = max([self.longest, *out.n_tokens])
        return out

    def summary(self) -> str:
        return (
            f"prompts encoded: {self.prompts}, truncated to {self.max_tokens} tokens: {self.truncated}, "
            f"longest: {self.longest} tokens"
        )

    @property
    def settings(self) -> dict[str, Any]:
        """What a text-encoder cache must key on besides the weights."""
        return {"max_tokens": self.max_tokens, "layout": self.layout, "dynamic_windows": self.dynamic_windows}


def make_time_ids(
    original_sizes_hw: Iterable[tuple[int, int]],
    crops_top_left: Iterable[tuple[int, int]],
    target_sizes_hw: Iterable[tuple[int, int]],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """SDXL ``add_time_ids`` (B, 6): (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    rows = [
        (int(o[0]), int(o[1]), int(c[0]), int(c[1]), int(t[0]), int(t[1]))
        for o, c, t in zip(original_sizes_hw, crops_top_left, target_sizes_hw, strict=True)
    ]
    return torch.tensor(rows, dtype=dtype, device=device).reshape(-1, 6)
