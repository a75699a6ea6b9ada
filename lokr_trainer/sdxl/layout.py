"""SDXL facts, written once: components, key prefixes, verbatim keys, embeddings, folder layout.

Every module that needs one of these imports it from here (``sdxl.keys``,
``sdxl.load``, the merge), so a fact cannot drift between two copies.  No
torch or diffusers import: the merge reads these without loading any model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from lokr_trainer.errors import CheckpointError, CorruptFileError, MissingComponentError, WrongModelError

#: The four networks of an SDXL checkpoint, as ``SDXLModels`` attributes (file order).
COMPONENTS: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2", "vae")

#: Short labels for reports and messages.
LABELS: dict[str | None, str] = {"unet": "UNet", "text_encoder": "TE1", "text_encoder_2": "TE2", "vae": "VAE", None: "other"}

#: Single-file key prefix of each component.
PREFIXES: dict[str, str] = {
    "unet": "model.diffusion_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
    "vae": "first_stage_model.",
}

#: Single-file keys that are not parameters of a diffusers/transformers module.
#: They are carried through every load, save and merge verbatim.
PASSTHROUGH_KEYS: frozenset[str] = frozenset(
    {
        PREFIXES["text_encoder"] + "text_model.embeddings.position_ids",
        PREFIXES["text_encoder_2"] + "logit_scale",
    }
)

def passthrough_defaults(n_positions: int = 77) -> dict:
    """The verbatim keys' values as a real SDXL file holds them, for sources that lack them (diffusers).

    ``position_ids`` = arange(77) as int64 [1, 77]; bigG's learned temperature
    ``logit_scale`` = ln(100) in fp16.  torch is imported here only.
    """
    import math

    import torch

    return {
        PREFIXES["text_encoder"] + "text_model.embeddings.position_ids": torch.arange(n_positions, dtype=torch.int64)[None],
        PREFIXES["text_encoder_2"] + "logit_scale": torch.tensor(math.log(100.0), dtype=torch.float16),
    }


#: The CLIP token and position embeddings that an embedding restore copies (DESIGN.md §5).
EMBEDDING_KEYS: tuple[str, ...] = (
    PREFIXES["text_encoder"] + "text_model.embeddings.token_embedding.weight",
    PREFIXES["text_encoder"] + "text_model.embeddings.position_embedding.weight",
    PREFIXES["text_encoder_2"] + "token_embedding.weight",
    PREFIXES["text_encoder_2"] + "positional_embedding",
)

#: Diffusers pipeline folder: component → sub-folder, and the stem of its weight file(s).
DIFFUSERS_FOLDERS: dict[str, str] = {c: c for c in COMPONENTS}
DIFFUSERS_WEIGHT_STEMS: dict[str, str] = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}


def diffusers_weight_files(sub: Path, stem: str) -> list[Path]:
    """The safetensors files of one diffusers component (plain, sharded or one variant)."""
    if not sub.is_dir():
        raise MissingComponentError(sub, "folder missing", "expected an SDXL diffusers folder with unet/, text_encoder/, text_encoder_2/, vae/")
    plain = sub / f"{stem}.safetensors"
    if plain.is_file():
        return [plain]
    index = sub / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CorruptFileError(index, f"not a safetensors index ({e})") from None
        files = []
        root = sub.resolve()
        for name in dict.fromkeys(weight_map.values() if isinstance(weight_map, dict) else ()):
            target = (sub / str(name)).resolve()
            if not isinstance(name, str) or root not in target.parents:
                raise CorruptFileError(index, f"weight_map points outside its folder ({name!r}); refusing to read it")
            files.append(sub / name)
        if not files:
            raise CorruptFileError(index, "weight_map is empty or not a table")
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise MissingComponentError(
                index, f"names {len(missing)} shard(s) that are missing: {', '.join(missing[:3])}",
                "copy the missing shard files into the folder",
            )
        return files
    variants = sorted(p for p in sub.glob(f"{stem}.*.safetensors") if ".index." not in p.name)
    if len(variants) == 1:
        return variants
    if variants:
        raise CheckpointError(
            sub, f"several weight variants ({', '.join(p.name for p in variants)}) and no plain {stem}.safetensors",
            "give a folder with one variant, or convert it to a single file first",
        )
    if any(sub.glob("*.bin")):
        raise CheckpointError(sub, "holds only pickle (.bin) weights", "the merge reads safetensors only; convert the folder first")
    raise MissingComponentError(sub, f"no {stem}.safetensors weights")


def read_component_config(sub: Path) -> dict:
    cfg = sub / "config.json"
    if not cfg.is_file():
        raise MissingComponentError(cfg, "file missing", "a diffusers component needs its config.json")
    try:
        data = json.loads(cfg.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptFileError(cfg, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CorruptFileError(cfg, f"holds a JSON {type(data).__name__}, not a config object")
    return data


#: SAI model spec strings UIs recognise SDXL by (checkpoints; adapters append ``/lora``).
MODELSPEC_SPEC_VERSION = "1.0.0"
MODELSPEC_ARCHITECTURE = "stable-diffusion-xl-v1-base"
MODELSPEC_LORA_ARCHITECTURE = MODELSPEC_ARCHITECTURE + "/lora"
MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"

#: File suffixes of pickle checkpoints (read only behind an explicit opt-in, with ``weights_only``).
PICKLE_SUFFIXES: tuple[str, ...] = (".ckpt", ".pt", ".pth", ".bin")


def check_is_sdxl(keys: Iterable[str], path: Path | None) -> None:
    """Raise a clear error for SD1.x/SD2.x/refiner/partial files given as SDXL base (keys only)."""
    keys = list(keys)
    has = {c: any(k.startswith(p) for k in keys) for c, p in PREFIXES.items()}
    if all(has.values()):
        return
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        raise WrongModelError(path, "not an SDXL checkpoint: this is Stable Diffusion 1.x (CLIP under cond_stage_model.transformer)")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise WrongModelError(path, "not an SDXL checkpoint: this is Stable Diffusion 2.x (OpenCLIP under cond_stage_model.model)")
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys) and not has["text_encoder"]:
        raise WrongModelError(path, "this is an SDXL refiner checkpoint (one OpenCLIP encoder); lokr_trainer needs an SDXL base model")
    if not any(has.values()):
        sample = ", ".join(sorted(keys)[:3]) or "no tensors"
        raise WrongModelError(path, f"not an SDXL checkpoint: no SDXL component found (first keys: {sample})",
                              "expected a single-file SDXL checkpoint")
    missing = [f"{LABELS[c]} ({PREFIXES[c]}*)" for c, ok in has.items() if not ok]
    raise MissingComponentError(
        path,
        "SDXL components missing: " + ", ".join(missing),
        "use a full SDXL checkpoint with UNet, both text encoders and the VAE",
    )
