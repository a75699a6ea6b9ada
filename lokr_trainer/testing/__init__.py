"""Tiny, randomly initialised SDXL-shaped models for tests, examples and the demo.

Public on purpose: users reproduce bug reports and try recipes on it without
downloading 7 GB.  Shapes follow DESIGN.md §8; key names are real SDXL names.
"""

from lokr_trainer.testing.full_size import write_random_sdxl
from lokr_trainer.testing.tiny_data import make_tiny_dataset
from lokr_trainer.testing.tiny_sdxl import TinySDXLPaths, build_tiny_sdxl, make_tiny_sdxl

__all__ = ["TinySDXLPaths", "build_tiny_sdxl", "make_tiny_dataset", "make_tiny_sdxl", "write_random_sdxl"]
