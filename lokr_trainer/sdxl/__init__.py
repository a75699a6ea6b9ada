"""Everything that knows SDXL's layout: key maps, configs, tokenizers, load/save.

Heavy libraries (diffusers, transformers) are imported only when a network is
built, so ``lokr_trainer.sdxl.keys`` stays cheap for the merge tool.
"""

from lokr_trainer.sdxl.load import SDXLModels, load_sdxl, save_sdxl

__all__ = ["SDXLModels", "load_sdxl", "save_sdxl"]
