"""LoKr adapters for SDXL: name table, file format, targets, attachment.

``lokr_trainer.lokr.io`` and ``lokr_trainer.lokr.names`` import neither
diffusers nor transformers (the merge tool reads adapters through them);
keep this package's ``__init__`` free of eager imports of the attach code.
"""
