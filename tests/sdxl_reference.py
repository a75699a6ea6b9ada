"""Test-side access to the real SDXL 1.0 base key list (see lokr_trainer.sdxl.reference)."""

from lokr_trainer.sdxl.reference import sdxl_base_keys, sdxl_base_shapes

__all__ = ["sdxl_base_keys", "sdxl_base_shapes"]
