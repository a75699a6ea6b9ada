"""Load and save SDXL checkpoints (single file or diffusers folder), fully offline.

Single files are read tensor by tensor into networks built on the meta device,
so loading never holds two copies of the weights; saving streams one tensor at
a time into a temporary file renamed into place at the end.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import torch

from lokr_trainer.errors import (
    CheckpointError,
    CorruptFileError,
    KeyMapError,
    MissingComponentError,
    OutputWriteError,
    UnsafeFormatError,
)
from lokr_trainer.safetensors_io import PlannedTensor, SafetensorsReader, parse_dtype, write_safetensors
from lokr_trainer.sdxl import configs
from lokr_trainer.sdxl.layout import (
    DIFFUSERS_FOLDERS,
    DIFFUSERS_WEIGHT_STEMS,
    diffusers_weight_files,
    read_component_config,
    MODELSPEC_ARCHITECTURE,
    MODELSPEC_IMPLEMENTATION,
    MODELSPEC_SPEC_VERSION,
    PICKLE_SUFFIXES,
    check_is_sdxl,
    passthrough_defaults,
)
from lokr_trainer.sdxl.keys import (
    COMPONENTS,
    PASSTHROUGH_KEYS,
    Layouts,
    canonical_name,
    component_of,
    convert_file_tensor,
    live_name,
    model_state_to_file,
)

logger = logging.getLogger(__name__)



@dataclass
class SDXLModels:
    """The networks, tokenizers and schedule of one SDXL checkpoint."""

    unet: Any
    text_encoder: Any
    text_encoder_2: Any
    vae: Any
    tokenizer: Any
    tokenizer_2: Any
    scheduler_config: dict[str, Any]
    #: Single-file tensors that are not module parameters (CLIP ``position_ids``,
    #: bigG ``logit_scale``, markers such as ``v_pred``), carried verbatim.
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    source: Path | None = None

    def components(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self, name) for name in COMPONENTS}


# --------------------------------------------------------------------------- model construction


def build_unet(config: Mapping[str, Any]):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**config)


def _clip_config(config: Mapping[str, Any]):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**config)


def build_text_encoder(config: Mapping[str, Any]):
    from transformers import CLIPTextModel

    return CLIPTextModel(_clip_config(config))


def build_text_encoder_2(config: Mapping[str, Any]):
    from transformers import CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(_clip_config(config))


def build_vae(config: Mapping[str, Any]):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**config)


BUILDERS = {
    "unet": build_unet,
    "text_encoder": build_text_encoder,
    "text_encoder_2": build_text_encoder_2,
    "vae": build_vae,
}


@contextmanager
def _quiet_transformers():
    """transformers/diffusers warn loudly about meta init and unused config keys, and
    transformers 5 draws a "Loading weights" bar per text encoder (even under --no-progress)."""
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(n) for n in ("transformers", "diffusers")]
    levels = [lg.level for lg in loggers]
    bars = hf_logging.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)
        if bars:
            hf_logging.enable_progress_bar()


def build_empty(component: str, config: Mapping[str, Any]) -> torch.nn.Module:
    """The network with parameters on the meta device (no memory) and real buffers."""
    from accelerate import init_empty_weights

    with _quiet_transformers(), init_empty_weights(include_buffers=False):
        return BUILDERS[component](config)


def infer_configs(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, dict[str, Any]]:
    """Per-component configs from single-file tensor shapes."""
    return {
        "unet": configs.infer_unet_config(shapes),
        "text_encoder": configs.infer_text_encoder_config(shapes),
        "text_encoder_2": configs.infer_text_encoder_2_config(shapes),
        "vae": configs.infer_vae_config(shapes),
    }


# --------------------------------------------------------------------------- model kind detection


# --------------------------------------------------------------------------- loading


class _PickleSource:
    """A legacy ``.ckpt`` read with ``torch.load(weights_only=True)`` only."""

    def __init__(self, path: Path) -> None:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable file
            raise CorruptFileError(path, f"cannot be read with torch.load(weights_only=True): {e}") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CorruptFileError(path, "does not hold a state dict")
        self.tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        self.metadata: dict[str, str] = {}

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.tensors.items()}

    def get(self, key: str) -> torch.Tensor:
        return self.tensors.pop(key)

    def close(self) -> None:
        self.tensors.clear()


class _SafetensorsSource:
    def __init__(self, path: Path) -> None:
        self.reader = SafetensorsReader(path)
        self.metadata = self.reader.header.metadata

    def keys(self) -> list[str]:
        return self.reader.keys()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.reader.header.shapes()

    def get(self, key: str) -> torch.Tensor:
        return self.reader.get(key)

    def close(self) -> None:
        self.reader.close()


def _open_source(path: Path, allow_pickle: bool):
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UnsafeFormatError(
                path,
                "is a pickle checkpoint, which can run code when loaded",
                "convert it to .safetensors, or pass allow_pickle=True (--allow-pickle) to read it with "
                "torch.load(weights_only=True)",
            )
        return _PickleSource(path)
    return _SafetensorsSource(path)


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        return t.to(dtype)
    return t


def _scheduler_config(extra_keys: set[str]) -> dict[str, Any]:
    cfg = dict(configs.SDXL_SCHEDULER_CONFIG)
    if "v_pred" in extra_keys:  # marker key used by v-prediction SDXL finetunes
        cfg["prediction_type"] = "v_prediction"
    if "ztsnr" in extra_keys:
        cfg["rescale_betas_zero_snr"] = True
    return cfg


def load_single_file(
    path: str | Path,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
) -> SDXLModels:
    """Load a single-file SDXL checkpoint (LDM/SGM layout)."""
    from lokr_trainer.sdxl.tokenizers import load_tokenizers

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found")
    src = _open_source(path, allow_pickle)
    try:
        keys = src.keys()
        check_is_sdxl(keys, path)
        shapes = src.shapes()
        try:
            cfgs = infer_configs(shapes)
            layouts = Layouts.from_file_keys(keys)
            models = {c: build_empty(c, cfgs[c]) for c in COMPONENTS}
        except KeyMapError as e:
            raise CorruptFileError(path, f"not a complete SDXL checkpoint: {e}") from None
        except (IndexError, KeyError, ValueError, TypeError, ZeroDivisionError, RuntimeError) as e:
            # shapes that name SDXL keys but do not form SDXL networks (a 1-D label_emb, no input ResNets)
            raise CorruptFileError(
                path, f"the tensor shapes do not form SDXL networks ({type(e).__name__}: {e})",
                "the file is damaged or not an SDXL checkpoint",
            ) from None
        states: dict[str, dict[str, torch.Tensor]] = {c: {} for c in COMPONENTS}
        extra: dict[str, torch.Tensor] = {}
        for key in keys:
            comp = component_of(key)
            if comp is None or key in PASSTHROUGH_KEYS:
                extra[key] = src.get(key)
                continue
            try:
                pieces = list(convert_file_tensor(key, src.get(key), layouts))
            except KeyMapError as e:
                raise CorruptFileError(path, f"unexpected tensor {key!r}: {e}") from None
            for comp, name, tensor in pieces:
                live = live_name(name, models[comp])
                states[comp][live] = _cast(tensor, dtype).to(device)
        for comp in COMPONENTS:
            _assign(models[comp], states.pop(comp), path, comp)
    finally:
        src.close()
    tok1, tok2 = load_tokenizers(None)
    foreign = sorted(k for k in extra if k not in PASSTHROUGH_KEYS)
    if foreign:
        logger.info("%s: carrying %d non-SDXL tensors verbatim: %s", path, len(foreign), ", ".join(foreign[:5]))
    return SDXLModels(
        unet=models["unet"],
        text_encoder=models["text_encoder"],
        text_encoder_2=models["text_encoder_2"],
        vae=models["vae"],
        tokenizer=tok1,
        tokenizer_2=tok2,
        scheduler_config=_scheduler_config(set(extra)),
        extra_tensors=extra,
        metadata=dict(src.metadata),
        source=path,
    )


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, comp: str) -> None:
    expected = dict(model.state_dict(keep_vars=True))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise CorruptFileError(path, f"{comp} tensors do not match an SDXL {comp}: " + "; ".join(parts))
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items() if v.shape != expected[k].shape
    ]
    if bad:
        raise CorruptFileError(path, f"{comp} shape mismatch: " + "; ".join(bad[:3]))
    ints = [k for k, v in state.items() if expected[k].is_floating_point() and not v.is_floating_point()]
    if ints:
        raise CorruptFileError(
            path, f"{comp} weights stored as integers: {', '.join(f'{k} ({state[k].dtype})' for k in ints[:3])}",
            "network weights are floating point; the file is damaged",
        )
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()


def load_diffusers_folder(
    folder: str | Path,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
) -> SDXLModels:
    """Load a diffusers SDXL folder from disk only (never the hub)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from lokr_trainer.sdxl.tokenizers import load_tokenizers

    folder = Path(folder)
    missing = [sub for sub in DIFFUSERS_FOLDERS.values() if not (folder / sub).is_dir()]
    if missing:
        raise MissingComponentError(
            folder, "diffusers folder lacks " + ", ".join(f"{m}/" for m in missing), "expected an SDXL pipeline folder"
        )
    for sub in DIFFUSERS_FOLDERS.values():
        has_st = any((folder / sub).glob("*.safetensors"))
        has_pickle = any((folder / sub).glob("*.bin"))
        if not has_st and has_pickle and not allow_pickle:
            raise UnsafeFormatError(
                folder / sub, "holds only pickle (.bin) weights", "convert to safetensors or pass allow_pickle=True"
            )
        if not has_st and not has_pickle:
            raise MissingComponentError(folder / sub, "has no weight file")
    for comp, sub in DIFFUSERS_FOLDERS.items():  # the merge's own checks: config, index, shards present
        read_component_config(folder / sub)
        if any((folder / sub).glob("*.safetensors")):
            diffusers_weight_files(folder / sub, DIFFUSERS_WEIGHT_STEMS[comp])
    kw: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kw["torch_dtype"] = dtype
    loaders = {
        "unet": UNet2DConditionModel,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
        "vae": AutoencoderKL,
    }
    models = {}
    for comp, cls in loaders.items():
        sub = folder / DIFFUSERS_FOLDERS[comp]
        try:
            with _quiet_transformers():
                models[comp] = cls.from_pretrained(sub, use_safetensors=not allow_pickle or None, **kw).to(device)
        except Exception as e:  # noqa: BLE001 - diffusers/transformers raise many types
            raise CorruptFileError(sub, f"cannot load {comp}: {e}") from None
        models[comp].eval()
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched = dict(configs.SDXL_SCHEDULER_CONFIG)
    if sched_file.is_file():
        sched.update(json.loads(sched_file.read_text()))
    tok1, tok2 = load_tokenizers(folder)
    return SDXLModels(
        unet=models["unet"],
        text_encoder=models["text_encoder"],
        text_encoder_2=models["text_encoder_2"],
        vae=models["vae"],
        tokenizer=tok1,
        tokenizer_2=tok2,
        scheduler_config=sched,
        source=folder,
    )


def load_sdxl(
    path: str | Path,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
) -> SDXLModels:
    """Load SDXL from a single ``.safetensors`` file or a diffusers folder, offline.

    ``dtype`` casts floating weights (None keeps the file's dtypes).  Pickle
    files (``.ckpt``) are refused unless ``allow_pickle=True``, and even then
    are read with ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    if path.is_dir():
        return load_diffusers_folder(path, dtype=dtype, device=device, allow_pickle=allow_pickle)
    return load_single_file(path, dtype=dtype, device=device, allow_pickle=allow_pickle)


# --------------------------------------------------------------------------- saving


def _layouts_of(models: SDXLModels) -> Layouts:
    from lokr_trainer.sdxl.keys import UNetLayout, VAELayout

    return Layouts(
        unet=UNetLayout.from_diffusers_config(models.unet.config),
        vae=VAELayout(len(models.vae.config.block_out_channels)),
    )


def _default_passthrough(models: SDXLModels) -> dict[str, torch.Tensor]:
    """position_ids and logit_scale as a real SDXL file has them, when the source lacked them."""
    return passthrough_defaults(models.text_encoder.config.max_position_embeddings)


def iter_single_file_tensors(models: SDXLModels) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (single-file key, tensor) of the models, uncast, in component order."""
    layouts = _layouts_of(models)
    for comp in COMPONENTS:
        model = getattr(models, comp)
        state = {canonical_name(k, model): v.detach() for k, v in model.state_dict().items()}
        yield from model_state_to_file(comp, state, layouts)
    yield from {**_default_passthrough(models), **models.extra_tensors}.items()


def sdxl_metadata(title: str = "lokr_trainer checkpoint", extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """modelspec (SAI model spec) metadata that UIs read to recognise SDXL."""
    import datetime

    from lokr_trainer import __version__

    meta = {
        "modelspec.sai_model_spec": MODELSPEC_SPEC_VERSION,
        "modelspec.architecture": MODELSPEC_ARCHITECTURE,
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": "1024x1024",
        "modelspec.date": datetime.date.today().isoformat(),
        "lokr_trainer.version": __version__,
    }
    meta.update(extra or {})
    return meta


def save_single_file(
    models: SDXLModels,
    path: str | Path,
    *,
    dtype: torch.dtype | None = torch.float16,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = True,
) -> Path:
    """Stream the models into one LDM/SGM-layout ``.safetensors`` file."""
    passthrough = {**_default_passthrough(models), **models.extra_tensors}

    def out_dtype(key: str, t: torch.Tensor) -> torch.dtype:
        if dtype is None or key in passthrough or not t.is_floating_point():
            return t.dtype
        return dtype

    # Two passes: shapes and dtypes for the header first, then each tensor is
    # cast and written as it comes, so no cast copy of the model is ever held.
    plan = [PlannedTensor(k, out_dtype(k, t), tuple(t.shape)) for k, t in iter_single_file_tensors(models)]
    meta = dict(models.metadata)
    meta.update(metadata or {})
    if not any(k.startswith("modelspec.") for k in meta):
        meta.update(sdxl_metadata())

    def produce() -> Iterator[tuple[str, torch.Tensor]]:
        for key, tensor in iter_single_file_tensors(models):
            yield key, tensor.to(out_dtype(key, tensor))

    return write_safetensors(path, plan, produce(), meta, overwrite=overwrite)


WEIGHT_FILES = {"diffusers": "diffusion_pytorch_model.safetensors", "transformers": "model.safetensors"}


def _save_component(model: torch.nn.Module, sub: Path, dtype: torch.dtype | None) -> None:
    """Config via the library, weights streamed and cast per tensor.

    ``save_pretrained`` would need the model cast in place (lossy for the
    caller's fp32 weights) or a full cast copy in RAM.  Text encoders are
    written with the canonical ``text_model.`` names every published SDXL
    folder uses, which transformers 4 and 5 both read.
    """
    sub.mkdir(parents=True, exist_ok=True)
    is_transformers = hasattr(model.config, "to_json_string")
    if is_transformers:
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.save_pretrained(sub)
    else:
        model.save_config(sub)
    state = {canonical_name(k, model): v.detach() for k, v in model.state_dict().items()}
    state = dict(sorted(state.items()))

    def cast(t: torch.Tensor) -> torch.Tensor:
        return _cast(t, dtype)

    plan = [PlannedTensor(k, cast(v).dtype if v.is_floating_point() else v.dtype, tuple(v.shape)) for k, v in state.items()]
    name = WEIGHT_FILES["transformers" if is_transformers else "diffusers"]
    write_safetensors(sub / name, plan, ((k, cast(v)) for k, v in state.items()), {"format": "pt"})


def save_diffusers_folder(
    models: SDXLModels,
    folder: str | Path,
    *,
    dtype: torch.dtype | None = torch.float16,
    overwrite: bool = False,
) -> Path:
    """Write a diffusers pipeline folder (safetensors weights, configs, tokenizers).

    Built under a temporary name beside ``folder`` and renamed into place when
    complete, so a failure (full disk, Ctrl-C) leaves no half folder; an
    existing folder is replaced only with ``overwrite=True``.
    """
    import shutil

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise CheckpointError(folder, "output exists", "pass overwrite=True to replace it")
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(folder, "exists and is not a folder; a diffusers layout is a folder")
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _write_diffusers_folder(models, tmp, dtype)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, OutputWriteError):
            raise OutputWriteError(folder, e) from e
        raise
    return folder


def _write_diffusers_folder(models: SDXLModels, folder: Path, dtype: torch.dtype | None) -> None:
    from lokr_trainer.sdxl.tokenizers import save_tokenizers

    for comp in COMPONENTS:
        _save_component(getattr(models, comp), folder / DIFFUSERS_FOLDERS[comp], dtype)
    save_tokenizers(models.tokenizer, models.tokenizer_2, folder)
    sched = folder / "scheduler"
    sched.mkdir(exist_ok=True)
    cfg = dict(models.scheduler_config)
    cfg.setdefault("_class_name", "EulerDiscreteScheduler")
    (sched / "scheduler_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", cfg["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_sdxl(
    models: SDXLModels,
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = torch.float16,
    layout: Literal["single_file", "diffusers"] = "single_file",
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save as one SDXL ``.safetensors`` file (default) or a diffusers folder.

    ``dtype`` (a torch dtype or ``"fp16"``/``"bf16"``/``"fp32"``) casts floating
    weights (None keeps them); integer tensors and the verbatim extras
    (``position_ids``, ``logit_scale``) are never cast.  An existing output is
    replaced only with ``overwrite=True``, like the merge.
    """
    dtype = None if dtype is None else parse_dtype(dtype)
    if layout == "single_file":
        return save_single_file(models, path, dtype=dtype, metadata=metadata, overwrite=overwrite)
    if layout == "diffusers":
        return save_diffusers_folder(models, path, dtype=dtype, overwrite=overwrite)
    raise ValueError(f"unknown layout {layout!r}: use 'single_file' or 'diffusers'")
