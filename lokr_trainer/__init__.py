"""lokr_trainer: LyCORIS LoKr adapters for SDXL — load, train, save, merge.

Subpackages:
    sdxl     load/save SDXL checkpoints offline, key maps, tokenizers
    testing  tiny SDXL-shaped fixtures for tests, examples and the demo
"""

from lokr_trainer.errors import LokrTrainerError
from lokr_trainer.quiet import quiet_bitsandbytes

quiet_bitsandbytes()  # diffusers and lycoris import bitsandbytes, which warns about an optional package

__version__ = "0.1.0"

__all__ = ["LokrTrainerError", "__version__"]
