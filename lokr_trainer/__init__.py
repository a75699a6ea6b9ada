"""lokr_trainer: LyCORIS LoKr adapters for SDXL — load, train, save, merge.

Subpackages:
    sdxl     load/save SDXL checkpoints offline, key maps, tokenizers
    lokr     LoKr adapters: names, targets, attach, forward modes, file io
    data     images and captions -> samples (no model code)
    train    the trainer (``python -m lokr_trainer.train``)
    merge    streaming merges and bakes (``python -m lokr_trainer.merge``)
    config   the run config
    testing  tiny SDXL-shaped fixtures for tests, examples and the demo
"""

from lokr_trainer.errors import LokrTrainerError
from lokr_trainer.quiet import quiet_bitsandbytes

quiet_bitsandbytes()  # diffusers and lycoris import bitsandbytes, which warns about an optional package

__version__ = "0.1.0"

__all__ = ["LokrTrainerError", "__version__"]
