"""LoKr adapters for SDXL: name table, file format, targets, attachment.

``lokr_trainer.lokr.io`` and ``lokr_trainer.lokr.names`` import neither
diffusers nor transformers (the merge tool reads adapters through them), so
this package resolves its public names lazily: ``from lokr_trainer.lokr import
load_lokr`` stays light, ``attach_lokr`` pulls in lycoris when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LoKrConfig": "targets",
    "FactorRule": "targets",
    "PRESETS": "targets",
    "TARGET_PRESETS": "targets",
    "attach_lokr": "attach",
    "attach_lokr_from_file": "attach",
    "LoKrNetwork": "attach",
    "save_lokr": "io",
    "load_lokr": "io",
    "write_lokr": "io",
    "LoKrFile": "io",
    "LoKrModuleWeights": "io",
    "lokr_name_to_sdxl_key": "names",
    "normalize_lokr_name": "names",
    "sdxl_module_table": "names",
    "ModuleTable": "names",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lokr_trainer.lokr.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lokr_trainer.lokr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
