"""Silencing of known-harmless library noise, in one place.

bitsandbytes 0.50 logs ``Failed to load CPU gemm_4bit_forward from
kernels-community`` (a WARNING, i.e. to stderr) on every import when the
optional ``kernels`` package is absent; it concerns 4-bit matmuls, which we
never use.  It is imported by lycoris-lora as well as by our 8-bit
optimizers, so the filter goes on before either imports it.
"""

from __future__ import annotations

import logging

_BNB_NOISY_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_NOISE = "kernels-community"


class _DropBnbKernelsNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return _BNB_NOISE not in record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True


def quiet_bitsandbytes() -> None:
    """Drop bitsandbytes' import-time ``kernels-community`` warning (idempotent)."""
    logger = logging.getLogger(_BNB_NOISY_LOGGER)
    if not any(isinstance(f, _DropBnbKernelsNoise) for f in logger.filters):
        logger.addFilter(_DropBnbKernelsNoise())
