"""Shared fixtures: one tiny SDXL per test session, written once to a temp folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that reaches for the hub fails loudly
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # tests/sdxl_reference.py


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """Paths of the tiny SDXL fixture (fp32): ``.single_file`` and ``.diffusers_dir``."""
    from lokr_trainer.testing import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"), seed=0)


@pytest.fixture(scope="session")
def tiny_models(tiny_sdxl):
    """The tiny SDXL loaded once from its single file (fp32). Do not mutate: load your own copy."""
    from lokr_trainer.sdxl import load_sdxl

    return load_sdxl(tiny_sdxl.single_file)
