"""Attach LoKr to SDXL's UNet and both text encoders through lycoris-lora.

Every selected Linear/Conv gets one ``lycoris.modules.lokr.LokrModule`` (the
LoKr parameterisation, init, ΔW and bypass maths are lycoris'); the module's
calls are routed through a :class:`~lokr_trainer.lokr.forward.LoKrSlot` that
picks the forward mode.  We do not use ``create_lycoris``/``LycorisNetwork``:
their presets are process-global class state and their names follow the live
module paths, which are wrong for the interop format under diffusers and
transformers 5.  Names here come from the explicit table in
:mod:`lokr_trainer.lokr.names`.

``LoKrNetwork`` is an ``nn.Module`` holding only the adapter parameters (the
base models are frozen and not registered in it), so ``network.parameters()``
are exactly the trainable ones, and ``network.to(device)`` moves only them.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from lokr_trainer.errors import ConfigError, WrongModelError
from lokr_trainer.quiet import quiet_bitsandbytes
from lokr_trainer.sdxl.layout import MODELSPEC_IMPLEMENTATION, MODELSPEC_LORA_ARCHITECTURE, MODELSPEC_SPEC_VERSION
from lokr_trainer.lokr import forward as fwd
from lokr_trainer.lokr.io import (
    SS_BASE_MODEL_VERSION,
    LoKrFile,
    LoKrModuleWeights,
    json_dumps,
    load_lokr,
)
from lokr_trainer.lokr.names import ADAPTER_COMPONENTS, MODEL_ATTR, ModuleEntry, ModuleTable, live_module_path
from lokr_trainer.lokr.targets import LoKrConfig, ModuleSettings

logger = logging.getLogger(__name__)



@dataclass
class _State:
    enabled: bool = True


def _factor_tensors(lyco: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors LyCORIS writes for this module (no scalar: we never use ``use_scalar``)."""
    out: dict[str, torch.Tensor] = {}
    if lyco.wd:
        out["dora_scale"] = lyco.dora_scale
    if lyco.use_w1:
        out["lokr_w1"] = lyco.lokr_w1
    else:
        out["lokr_w1_a"], out["lokr_w1_b"] = lyco.lokr_w1_a, lyco.lokr_w1_b
    if lyco.use_w2:
        out["lokr_w2"] = lyco.lokr_w2
    else:
        out["lokr_w2_a"], out["lokr_w2_b"] = lyco.lokr_w2_a, lyco.lokr_w2_b
        if lyco.tucker:
            out["lokr_t2"] = lyco.lokr_t2
    return out


class LoKrNetwork(nn.Module):
    """LoKr modules attached to an SDXL model; see :func:`attach_lokr`."""

    def __init__(
        self,
        models: Any,
        table: ModuleTable,
        plan: Sequence[tuple[ModuleEntry, ModuleSettings]],
        config: LoKrConfig,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        quiet_bitsandbytes()  # lycoris imports bitsandbytes
        from lycoris.modules.lokr import LokrModule

        self.config = config
        self.table = table
        self.lokr = nn.ModuleDict()
        self.entries: dict[str, ModuleEntry] = {}
        self.settings: dict[str, ModuleSettings] = {}
        self._targets: dict[str, nn.Module] = {}
        self._slots: dict[str, fwd.LoKrSlot] = {}
        self._state = _State()
        self._attached = False
        self._merged = False
        #: metadata of the file this network was loaded from (carried into saves)
        self.base_metadata: dict[str, str] = {}
        self._multiplier = float(config.multiplier)

        for entry, s in plan:
            model = getattr(models, MODEL_ATTR[entry.component])
            live = live_module_path(entry, model, table.layout)
            try:
                org = model.get_submodule(live)
            except AttributeError:
                raise WrongModelError(None, f"{entry.lokr_name}: the model has no module {live!r}") from None
            if type(org) not in (nn.Linear, nn.Conv2d):
                raise WrongModelError(
                    None, f"{entry.lokr_name}: {live!r} is a {type(org).__name__}, LoKr wraps nn.Linear/nn.Conv2d"
                )
            device = org.weight.device
            # lycoris prints "haven't implemented normal dropout" per module; it has, on the bypass path
            with torch.device(device), contextlib.redirect_stdout(io.StringIO()):
                lyco = LokrModule(
                    entry.lokr_name,
                    org,
                    multiplier=self._multiplier,
                    lora_dim=s.dim,
                    alpha=s.alpha,
                    dropout=config.dropout,
                    rank_dropout=config.rank_dropout,
                    module_dropout=config.module_dropout,
                    use_tucker=s.use_tucker,
                    decompose_both=s.decompose_both,
                    factor=s.factor,
                    rank_dropout_scale=config.rank_dropout_scale,
                    weight_decompose=s.weight_decompose,
                    full_matrix=s.full_matrix,
                    bypass_mode=False,
                    unbalanced_factorization=s.unbalanced_factorization,
                )
            for p in lyco.parameters():
                p.data = p.data.to(device=device, dtype=dtype)
            self.lokr[entry.lokr_name] = lyco
            self.entries[entry.lokr_name] = entry
            self.settings[entry.lokr_name] = s
            self._targets[entry.lokr_name] = org
            self._slots[entry.lokr_name] = fwd.LoKrSlot(lyco, s.forward_mode, self._state)
        self._install()
        for attr in ("unet", "text_encoder", "text_encoder_2", "vae"):
            model = getattr(models, attr, None)
            if isinstance(model, nn.Module):
                model.requires_grad_(False)

    # -- hooks ---------------------------------------------------------------------------

    def _install(self) -> None:
        done = []
        try:
            for name, slot in self._slots.items():
                fwd.install(self._targets[name], slot)
                done.append(name)
        except BaseException:
            for name in done:
                fwd.uninstall(self._targets[name])
            raise
        self._attached = True

    def remove(self) -> None:
        """Detach from the models: their modules run their own forward again."""
        if self._attached:
            for name in self._slots:
                fwd.uninstall(self._targets[name])
            self._attached = False

    def _check_live(self) -> None:
        if self._merged:
            raise ConfigError("this LoKr network was merged into the models; attach a new one to train further")

    # -- structure -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.lokr)

    def names(self, component: str | None = None) -> list[str]:
        return [n for n, e in self.entries.items() if component is None or e.component == component]

    def component_parameters(self, component: str) -> list[nn.Parameter]:
        return [p for n in self.names(component) for p in self.lokr[n].parameters() if p.requires_grad]

    def param_groups(
        self,
        lr: float | None = None,
        *,
        unet_lr: float | None = None,
        te1_lr: float | None = None,
        te2_lr: float | None = None,
        **group_options: Any,
    ) -> list[dict[str, Any]]:
        """Optimizer groups ``unet``, ``te1``, ``te2``, each with its own learning rate.

        ``lr`` is the fallback for a component whose own rate is not given;
        components without modules get no group.  Extra keyword options
        (``weight_decay``, ``betas`` …) go into every group.
        """
        rates = {"unet": unet_lr, "te1": te1_lr, "te2": te2_lr}
        groups = []
        for comp in ADAPTER_COMPONENTS:
            params = self.component_parameters(comp)
            if not params:
                continue
            rate = rates[comp] if rates[comp] is not None else lr
            if rate is None:
                raise ConfigError(f"no learning rate for the {comp} LoKr parameters: pass {comp}_lr= or lr=")
            groups.append({"params": params, "lr": float(rate), "name": comp, **group_options})
        return groups

    def summary(self, dtype: torch.dtype = torch.float16) -> "Any":
        """Modules, trainable parameters and file size per component and per factor."""
        from lokr_trainer.lokr.summary import summarize

        return summarize(self, dtype)

    # -- multiplier, enable/disable, forward modes -----------------------------------------

    @property
    def multiplier(self) -> float:
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self.set_multiplier(value)

    def set_multiplier(self, value: float) -> None:
        """Strength m in W + m·ΔW for every module (DoKr: LyCORIS' magnitude blend)."""
        self._multiplier = float(value)
        for lyco in self.lokr.values():
            lyco.multiplier = self._multiplier

    @property
    def enabled(self) -> bool:
        return self._state.enabled

    def enable(self) -> None:
        self._check_live()
        self._state.enabled = True

    def disable(self) -> None:
        """Run the base models unchanged (bit-exact), e.g. to sample the base for comparison."""
        self._state.enabled = False

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        previous = self._state.enabled
        self._state.enabled = False
        try:
            yield
        finally:
            self._state.enabled = previous

    def set_forward_mode(self, mode: str, names: Sequence[str] | None = None) -> None:
        """``auto``, ``bypass``, ``rebuild`` or ``merged`` for all (or the named) modules."""
        if mode not in ("auto",) + fwd.MODES:
            raise ConfigError(f"forward mode must be auto, {', '.join(fwd.MODES)}; got {mode!r}")
        for name in names if names is not None else self._slots:
            self._slots[name].set_mode(mode)

    def forward_modes(self, training: bool = True) -> dict[str, str]:
        """The mode each module runs in training (or inference) calls."""
        return {n: (s.auto_train if training else s.auto_infer) for n, s in self._slots.items()}

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - guidance only
        raise TypeError("LoKrNetwork is not called itself: call the UNet / text encoders it is attached to")

    # -- merge ------------------------------------------------------------------------------

    @torch.no_grad()
    def merge_into_models(self, multiplier: float | None = None) -> None:
        """Bake W ← W + m·ΔW into the models' weights (in RAM) and detach.

        ΔW comes from ``LokrModule.get_weight`` (scale applied once), never
        from lycoris' ``get_diff_weight``/``merge_to`` (scale applied twice in
        4.1.3).  Arithmetic in fp32, result cast to the weight's dtype.
        """
        self._check_live()
        m = self._multiplier if multiplier is None else float(multiplier)
        for name, lyco in self.lokr.items():
            weight = self._targets[name].weight
            w = weight.float()
            diff = lyco.get_weight(lyco.shape).float().to(w.device)
            if lyco.wd:
                new = lyco.apply_weight_decompose(w + diff, m)
            else:
                new = w + m * diff
            weight.copy_(new.to(weight.dtype))
        self.remove()
        self._merged = True

    # -- file I/O ---------------------------------------------------------------------------

    def file_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """name -> tensors as the interop file stores them (alpha first, LyCORIS layouts)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, lyco in self.lokr.items():
            tensors = {"alpha": lyco.alpha.detach().to(torch.float32).reshape(())}
            tensors.update({k: v.detach() for k, v in _factor_tensors(lyco).items()})
            out[name] = tensors
        return out

    def file_metadata(self) -> dict[str, str]:
        """``ss_*``, ``modelspec.*`` and ``lokr_trainer.*`` metadata for a save."""
        from lokr_trainer import __version__

        c = self.config
        args = {
            "algo": "lokr",
            "factor": str(c.factor),
            "full_matrix": str(c.full_matrix),
            "preset": c.preset or c.targets,
        }
        if c.decompose_both:
            args["decompose_both"] = "True"
        if c.use_tucker:
            args["use_tucker"] = "True"
        if c.weight_decompose:
            args["dora_wd"] = "True"
        meta = {
            "ss_network_module": "lycoris.kohya",
            "ss_network_args": json_dumps(args),
            "ss_network_dim": str(c.dim),
            "ss_network_alpha": str(c.alpha),
            "ss_base_model_version": SS_BASE_MODEL_VERSION,
            "ss_v2": "False",
            "modelspec.sai_model_spec": MODELSPEC_SPEC_VERSION,
            "modelspec.architecture": MODELSPEC_LORA_ARCHITECTURE,
            "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
            "modelspec.title": "lokr_trainer LoKr",
            "modelspec.date": datetime.date.today().isoformat(),
            "modelspec.resolution": "1024x1024",
        }
        meta.update(self.base_metadata)
        meta["lokr_trainer.version"] = __version__
        meta["lokr_trainer.lokr_config"] = c.to_json()
        return meta

    def save(
        self,
        path: str | Path,
        *,
        dtype: torch.dtype | str = torch.float16,
        metadata: Mapping[str, str] | None = None,
        overwrite: bool = False,
        extra_modules: Mapping[str, LoKrModuleWeights] | None = None,
    ) -> Path:
        from lokr_trainer.lokr.io import save_lokr

        return save_lokr(self, path, dtype=dtype, metadata=metadata, overwrite=overwrite, extra_modules=extra_modules)

    @torch.no_grad()
    def load_state(self, source: LoKrFile | str | Path, *, strict: bool = True) -> list[str]:
        """Load adapter weights from a file (ours, LyCORIS', kohya's) to continue training.

        Modules the file names but this network lacks (not in the model, or
        not selected by this config), modules whose tensor shapes differ, and
        (strict only) network modules the file does not have are an error
        naming them; ``strict=False`` loads the rest and warns.  Returns the
        names loaded.  The scale is recomputed from the file's alpha (lycoris
        does not recompute it on load).
        """
        self._check_live()
        f = source if isinstance(source, LoKrFile) else load_lokr(source, layout=self.table.layout, table=self.table, skip_unknown=True)
        problems: list[str] = [f"{s}: not a module of this model" for s in f.skipped]
        usable: list[str] = []
        for name, module in f.modules.items():
            if name not in self.lokr:
                where = "a module of this model not selected by this LoKr config" if name in self.table else "not a module of this model"
                problems.append(f"{name}: {where}")
                continue
            want = {k: tuple(v.shape) for k, v in _factor_tensors(self.lokr[name]).items()}
            got = {k: tuple(v.shape) for k, v in module.tensors.items() if k != "alpha"}
            if want != got:
                problems.append(f"{name}: file has {got}, the network has {want}")
                continue
            usable.append(name)
        if strict:
            problems += [f"{n}: in the network but not in the file" for n in self.lokr if n not in f.modules]
        if problems:
            listing = "; ".join(problems[:10]) + (f"; … {len(problems) - 10} more" if len(problems) > 10 else "")
            msg = f"{len(problems)} LoKr module(s) do not fit: {listing}"
            if strict:
                raise WrongModelError(f.path, msg, "pass strict=False to skip them with a warning")
            logger.warning("%s: %s; skipped", f.path, msg)
        for name in usable:
            self._assign(self.lokr[name], f.modules[name])
        self.base_metadata = dict(f.metadata)
        return usable

    @staticmethod
    def _assign(lyco: nn.Module, module: LoKrModuleWeights) -> None:
        targets = _factor_tensors(lyco)
        for k, param in targets.items():
            param.copy_(module.tensors[k].to(device=param.device, dtype=param.dtype))
        if module.alpha is not None:
            lyco.alpha.fill_(module.alpha)
        lyco.scale = module.scale


# --------------------------------------------------------------------------- entry points


def _table_for(models: Any) -> ModuleTable:
    return ModuleTable.from_models(models)


def attach_lokr(models: Any, config: LoKrConfig | Mapping[str, Any] | None = None, *, dtype: torch.dtype = torch.float32) -> LoKrNetwork:
    """Wrap the configured modules of ``models`` (``SDXLModels``) with LoKr and freeze the base.

    At initialisation ΔW = 0 (LyCORIS zero-inits W2 or W2's second half), so
    the wrapped models' outputs equal the base models' bit for bit.
    Works on meta-device models too (for sizing full SDXL without memory).
    """
    if config is None:
        config = LoKrConfig()
    elif not isinstance(config, LoKrConfig):
        config = LoKrConfig.from_dict(config)
    table = _table_for(models)
    return LoKrNetwork(models, table, config.resolve(table), config, dtype=dtype)


def infer_settings(module: LoKrModuleWeights, weight_shape: Sequence[int], base: ModuleSettings) -> ModuleSettings:
    """Constructor settings that make lycoris build ``module``'s exact factor shapes."""
    quiet_bitsandbytes()
    from lycoris.functional.general import factorization

    out, cin = int(weight_shape[0]), int(weight_shape[1])
    t = module.tensors
    a, c = (t["lokr_w1"].shape if module.w1_full else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1]))
    candidates = []
    for f in (a, c, max(a, c), min(a, c), -1, out // max(a, 1), cin // max(c, 1)):
        if (f >= 1 or f == -1) and f not in candidates:
            candidates.append(int(f))
    found = None
    for unbalanced in (False, True):
        for f in candidates:
            ol, ok = factorization(out, f)
            if unbalanced:
                ol, ok = ok, ol
            im, _ = factorization(cin, f)
            if (ol, im) == (a, c):
                found = (f, unbalanced)
                break
        if found:
            break
    if found is None:
        raise WrongModelError(
            None, f"{module.name}: W1 {(a, c)} is not a factorisation lycoris can build for a {out}x{cin} layer"
        )
    full = module.w1_full and module.w2_full
    rank = module.rank
    if not module.w1_full and not module.w2_full and t["lokr_w1_b"].shape[0] != t["lokr_w2_b"].shape[0]:
        raise WrongModelError(None, f"{module.name}: W1 and W2 are decomposed with different ranks; lycoris has one rank")
    dim = rank if rank is not None else 1
    alpha = module.alpha if module.alpha is not None else float(dim)
    return replace(
        base,
        factor=found[0],
        unbalanced_factorization=found[1],
        full_matrix=full,
        dim=int(dim),
        alpha=float(alpha),
        decompose_both=not module.w1_full,
        use_tucker=module.tucker,
        weight_decompose="dora_scale" in t,
        rule=None,
    )


def _fitting_weight(models: Any, table: ModuleTable, entry: ModuleEntry, module: LoKrModuleWeights,
                    label: str, where: str | Path | None = None) -> torch.Tensor:
    """The live weight ``module`` adapts; a :class:`WrongModelError` when its factors do not fit it."""
    model = getattr(models, MODEL_ATTR[entry.component])
    weight = model.get_submodule(live_module_path(entry, model, table.layout)).weight
    if not module.fits(tuple(weight.shape)):
        raise WrongModelError(where, f"{label}: factors give {module.kron_shape()}, the weight is {list(weight.shape)}")
    return weight


@torch.no_grad()
def bake_modules_into(
    models: Any, modules: Mapping[str, LoKrModuleWeights], table: ModuleTable | None = None, where: str | Path | None = None
) -> int:
    """W ← W + ΔW in the live models for each module (adapters kept frozen cost nothing per step).

    Computed in fp32 and stored in the layer's dtype, like the merge's bake.  A
    module the model lacks, or whose factors do not fit its layer, is a
    :class:`WrongModelError` naming it (``where``: the file), and then no
    weight has changed.  Returns the number of modules baked.
    """
    table = table if table is not None else _table_for(models)
    planned = []
    for name, module in modules.items():
        if name not in table:
            raise WrongModelError(where, f"{module.label}: not a module of this model")
        planned.append((_fitting_weight(models, table, table[name], module, module.label, where), module))
    for weight, module in planned:
        weight.copy_(module.apply_to_weight(weight).to(weight.dtype))
    return len(planned)


def attach_lokr_from_file(
    models: Any,
    source: LoKrFile | str | Path,
    config: LoKrConfig | None = None,
    *,
    strict: bool = True,
    dtype: torch.dtype = torch.float32,
) -> LoKrNetwork:
    """A network shaped exactly like a LoKr file (e.g. a published one), loaded to continue training.

    Module selection and factor shapes come from the file; ``config`` (else
    the one recorded in the file's ``lokr_trainer.lokr_config``, else the
    defaults) gives multiplier, dropout and forward mode.  Modules the model
    lacks are an error naming them (``strict=False``: skipped with a warning).
    """
    import json

    table = _table_for(models)
    f = source if isinstance(source, LoKrFile) else load_lokr(source, layout=table.layout, table=table, skip_unknown=True)
    if config is None:
        config = LoKrConfig()
        recorded = f.metadata.get("lokr_trainer.lokr_config")
        if recorded:
            try:
                config = LoKrConfig.from_dict(json.loads(recorded))
            except (ConfigError, ValueError, TypeError) as e:  # another version's table: shapes still come from the file
                logger.warning("%s: ignoring the recorded lokr_trainer.lokr_config (%s); using defaults", f.path, e)
    if f.skipped and strict:
        raise WrongModelError(
            f.path,
            f"{len(f.skipped)} LoKr module(s) are not modules of this model: {'; '.join(f.skipped[:10])}",
            "pass strict=False to skip them with a warning",
        )
    base = config.defaults()
    plan = []
    problems = []
    for entry in table.entries:
        module = f.modules.get(entry.lokr_name)
        if module is None:
            continue
        try:
            weight = _fitting_weight(models, table, entry, module, entry.lokr_name)
            plan.append((entry, infer_settings(module, tuple(weight.shape), base)))
        except WrongModelError as e:
            problems.append(e.problem)
    if problems:
        msg = f"{len(problems)} LoKr module(s) do not fit this model: {'; '.join(problems[:10])}"
        if strict:
            raise WrongModelError(f.path, msg, "pass strict=False to skip them with a warning")
        logger.warning("%s: %s; skipped", f.path, msg)
    if not plan:
        raise WrongModelError(f.path, "no LoKr module of this file fits the model")
    network = LoKrNetwork(models, table, plan, config, dtype=dtype)
    fitting = LoKrFile(f.path, {e.lokr_name: f.modules[e.lokr_name] for e, _ in plan}, f.metadata)
    network.load_state(fitting, strict=True)
    return network
