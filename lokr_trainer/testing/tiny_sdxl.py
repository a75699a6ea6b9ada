"""Build and write the tiny SDXL fixture (single file + diffusers folder)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lokr_trainer.sdxl import configs
from lokr_trainer.sdxl.layout import MODELSPEC_ARCHITECTURE, MODELSPEC_IMPLEMENTATION, MODELSPEC_SPEC_VERSION
from lokr_trainer.sdxl.load import (
    SDXLModels,
    _quiet_transformers,
    build_text_encoder,
    build_text_encoder_2,
    build_unet,
    build_vae,
    save_sdxl,
)

#: Fixed metadata so that the same seed gives the same bytes on any day.
TINY_METADATA = {
    "modelspec.sai_model_spec": MODELSPEC_SPEC_VERSION,
    "modelspec.architecture": MODELSPEC_ARCHITECTURE,
    "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
    "modelspec.title": "lokr_trainer tiny SDXL fixture",
    "modelspec.resolution": "64x64",
    "modelspec.date": "2024-01-01",
}


@dataclass(frozen=True)
class TinySDXLPaths:
    root: Path
    single_file: Path
    diffusers_dir: Path


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Overwrite every weight with seeded noise.

    Library initialisers change between versions and zero some layers; our own
    draw keeps the fixture identical across versions and makes every layer
    matter, so a wrong key map cannot hide behind a zero weight.
    """
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            if name.endswith("bias"):
                value = 0.1 * noise
            elif p.ndim == 1:  # norm scales
                value = 1.0 + 0.1 * noise
            elif "embedding" in name:
                value = 0.5 * noise
            else:
                fan_in = math.prod(p.shape[1:])
                value = noise / math.sqrt(fan_in)
            p.copy_(value.to(p.dtype))


def build_tiny_sdxl(seed: int = 0) -> SDXLModels:
    """The tiny SDXL networks and real CLIP tokenizers, in memory (fp32)."""
    from lokr_trainer.sdxl.tokenizers import build_tokenizers

    g = torch.Generator().manual_seed(seed)
    with _quiet_transformers():
        models = {
            "unet": build_unet(configs.TINY_UNET_CONFIG),
            "text_encoder": build_text_encoder(configs.TINY_TEXT_ENCODER_CONFIG),
            "text_encoder_2": build_text_encoder_2(configs.TINY_TEXT_ENCODER_2_CONFIG),
            "vae": build_vae(configs.TINY_VAE_CONFIG),
        }
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        _randomise(models[name], g)
        models[name].eval()
    tok1, tok2 = build_tokenizers()
    return SDXLModels(
        tokenizer=tok1,
        tokenizer_2=tok2,
        scheduler_config=dict(configs.SDXL_SCHEDULER_CONFIG),
        metadata=dict(TINY_METADATA),
        **models,
    )


def make_tiny_sdxl(
    out_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> TinySDXLPaths:
    """Write the tiny SDXL as ``tiny_sdxl.safetensors`` and ``tiny_sdxl_diffusers/``.

    Same seed, same bytes.  Weights are fp32 by default so numerical tests can
    use tight tolerances; pass ``dtype=torch.float16`` for a UI-like file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = build_tiny_sdxl(seed)
    single = save_sdxl(models, out / "tiny_sdxl.safetensors", dtype=dtype, metadata=TINY_METADATA, overwrite=True)
    folder = save_sdxl(models, out / "tiny_sdxl_diffusers", dtype=dtype, layout="diffusers", overwrite=True)
    return TinySDXLPaths(root=out, single_file=single, diffusers_dir=folder)
