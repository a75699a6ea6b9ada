"""``Trainer(config).fit()``: the accelerate loop around :class:`SDXLTrainingModule`.

What it guarantees (DESIGN.md §6, research/training.md):

* **Layout independence.**  An optimizer step's samples are one global batch
  (:mod:`lokr_trainer.train.batching`), every random draw is seeded per
  sample, and each rank's micro-batch loss is ``Σ w·ℓ · P / n`` (``n`` real
  samples in the step, ``P`` processes): with DDP's mean over ranks and the
  sum over accumulated micro-steps the gradient is that of the step's mean
  loss, however the global batch is split.
* **Exact resume.**  The data position is the step number; states hold the
  adapter, optimizer, scheduler, scaler and RNGs; the scheduler is stepped
  here once per optimizer step (never through ``prepare``, which would step it
  once per process).  Resuming to step n gives the bytes n straight steps give.
* **No lost work.**  States are atomic; SIGINT/SIGTERM stop at the next step
  boundary with a state; a non-finite loss or gradient skips the step (counted)
  and ``max_bad_steps`` in a row stop the run, keeping the last good state.
* Inputs are checked before any model loads; every user error is a
  :class:`~lokr_trainer.errors.LokrTrainerError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lokr_trainer.data.records import SampleRecord
from lokr_trainer.data.tags import Captioner
from lokr_trainer.errors import CheckpointError, ConfigError, DataError, LokrTrainerError, TrainingError
from lokr_trainer.lokr.io import json_dumps
from lokr_trainer.safetensors_io import parse_dtype
from lokr_trainer.train.batching import GlobalBatchPlan, Layout, MicroBatchSampler, WeightedSamples, collate_weighted
from lokr_trainer.train.checkpoint import (
    STATE_DIR,
    check_resume_compatible,
    list_states,
    load_state,
    resolve_resume,
    save_state,
    set_rng_state,
)

logger = logging.getLogger(__name__)



@dataclass
class TrainerHooks:
    """Extension and test points.

    ``loss(step, micro_step, loss) -> loss`` may replace a micro-batch loss
    (tests inject NaN with it); ``after_step(trainer, step)`` runs after every
    optimizer step on every rank.

    ``caption(caption, record, rng) -> str`` is a custom caption processor:
    it gets each sample's caption *after* the built-in ``[caption]`` processing
    (Kohaku tags, shuffle, dropouts), its :class:`~lokr_trainer.data.SampleRecord`
    and a numpy ``Generator`` seeded from (seed, epoch, index) on its own stream,
    and returns the caption to train on (training and validation captions).
    Draw randomness only from ``rng`` and the run stays reproducible and
    independent of workers and ranks.  Not with ``data.cache_text`` (cached
    captions would skip it); a resume trusts it to be the same function.
    """

    loss: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None
    after_step: Callable[["Trainer", int], None] | None = None
    caption: Callable[[str, SampleRecord, np.random.Generator], str] | None = None


#: numpy stream of the caption hook's per-sample generator (the built-in captions use CAPTION_STREAM)
CAPTION_HOOK_STREAM = 0xCA7


class HookedCaptioner(Captioner):
    """The built-in captioner followed by :attr:`TrainerHooks.caption` (picklable for DataLoader workers)."""

    def __init__(self, records: Any, cfg: Any, seed: int, fn: Callable[[str, SampleRecord, np.random.Generator], str]) -> None:
        super().__init__(records, cfg, seed=seed)
        self.fn = fn

    def __call__(self, record: SampleRecord, epoch: int = 0, index: int = 0) -> str:
        caption = super().__call__(record, epoch, index)
        out = self.fn(caption, record, np.random.default_rng([int(self.seed), int(epoch), int(index), CAPTION_HOOK_STREAM]))
        if not isinstance(out, str):
            raise TrainingError(f"TrainerHooks.caption returned {type(out).__name__} for {record.key}; it must return a str")
        return out


@dataclass
class TrainResult:
    """What a :meth:`Trainer.fit` call did."""

    output_dir: Path
    adapter: Path | None
    start_step: int
    steps_done: int
    total_steps: int
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    skipped_images: int = 0
    stopped: str = "done"  # done | stop_after | signal
    state: Path | None = None
    seconds: float = 0.0


class _AlreadyComplete(Exception):
    """_setup() found the resumed run finished, final adapter written (caught by fit(), never seen by users)."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(step, total)
        self.step, self.total = step, total


class _StopRequest:
    """SIGINT/SIGTERM → stop at the next optimizer-step boundary (a second SIGINT aborts)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._previous.clear()
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("%s received: saving a state at the next step boundary, then stopping (Ctrl-C again aborts)", signal.Signals(signum).name)


class Trainer:
    """Trains the LoKr adapters a :class:`~lokr_trainer.config.RunConfig` describes.

    ``resume`` is ``None`` (new run: refused if ``output_dir`` already holds
    states), ``"latest"`` or a state / output folder.
    """

    def __init__(
        self,
        config: Any,
        *,
        resume: str | None = None,
        hooks: TrainerHooks | None = None,
        accelerator: Any = None,
        progress: bool = True,
    ) -> None:
        self.cfg = config
        self.resume = resume
        self.hooks = hooks or TrainerHooks()
        self.progress = progress
        self.output_dir = Path(config.train.output_dir)
        failure = _attempt(self._check_inputs)
        if failure is not None and accelerator is None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            raise failure  # one process: nobody waits for it, fail before accelerate starts
        self.accelerator = accelerator if accelerator is not None else self._make_accelerator()
        self._agree(failure, "checking the inputs")
        acc = self.accelerator
        accum, _ = config.train.accumulation(acc.num_processes)  # refuses a global batch that does not divide
        self.layout = Layout(config.train.batch_size, accum, acc.num_processes)
        self.rank = acc.process_index
        #: (step, validation loss) pairs of this fit() call, on the main process
        self.validation_history: list[tuple[int, float]] = []

    # ------------------------------------------------------------------ checks before any model loads

    def _check_inputs(self) -> None:
        """Settings that cannot work together first (they need no file), then the paths."""
        cfg = self.cfg
        if cfg.data.cache_latents and cfg.data.crop != "center":
            raise ConfigError("data.cache_latents needs data.crop = 'center' (random crops change every epoch)")
        if cfg.data.cache_text and self.hooks.caption is not None:
            raise ConfigError("data.cache_text cannot be used with a TrainerHooks.caption processor "
                              "(cached captions would skip it): set data.cache_text = false")
        if cfg.data.cache_text:
            from lokr_trainer.train.encode import check_te_cache_allowed

            try:
                check_te_cache_allowed(cfg.caption, cfg.train.train_text_encoders)
            except ConfigError as e:
                raise ConfigError(f"data.cache_text: {e}") from None
        if cfg.model.dtype != "fp32" and cfg.train.mixed_precision == "no":
            raise ConfigError(
                f"model.dtype = {cfg.model.dtype!r} needs train.mixed_precision = 'fp16' or 'bf16' "
                "(the fp32 adapters meet the base weights under autocast)"
            )
        model = Path(cfg.model.path)
        if not model.exists():
            raise ConfigError(f"model.path: {model} does not exist (a .safetensors file or a diffusers folder)")
        for key, paths in (("data.path", cfg.data.path), ("validation.path", cfg.validation.path)):
            for p in paths:
                if not _source_exists(p):
                    raise ConfigError(f"{key}: {p} does not exist (a folder, a .jsonl manifest or a .tar shard pattern)")
        if cfg.model.init_lokr and not Path(cfg.model.init_lokr).is_file():
            raise ConfigError(f"model.init_lokr: {cfg.model.init_lokr} is not a file (a LoKr .safetensors file, or empty)")

    def _make_accelerator(self) -> Any:
        from accelerate import Accelerator, DistributedDataParallelKwargs

        # module dropout leaves whole adapters without gradients in some steps
        find_unused = self.cfg.lokr.module_dropout > 0
        # accelerate only sets up gloo (MULTI_CPU) when told cpu=True: without it a 2-process CPU
        # launch silently runs as 2 independent single processes
        cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        _forget_previous_accelerator(self.cfg.train.mixed_precision)
        try:
            return Accelerator(
                cpu=cpu,
                mixed_precision=self.cfg.train.mixed_precision,
                kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
            )
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"train.mixed_precision = {self.cfg.train.mixed_precision!r}: {e}") from None

    def _agree(self, error: LokrTrainerError | None, what: str, identity: dict | None = None) -> None:
        """Every rank says whether ``what`` worked on it; if it failed anywhere, every rank stops.

        A rank that stops alone (a path missing on one node, a node-local
        output_dir without the state to resume) would leave the others
        waiting in their next collective until the NCCL/gloo timeout.  With
        ``identity``, every rank must also see the same run (model bytes, data
        set, config): nodes reading different copies would train on different
        batch plans without any error.
        """
        acc = self.accelerator
        if acc.num_processes == 1:
            if error is not None:
                raise error
            return
        from accelerate.utils import gather_object

        mine = {"rank": acc.process_index, "host": socket.gethostname(), "identity": identity,
                "error": None if error is None else str(error), "exit_2": isinstance(error, (ConfigError, DataError, CheckpointError))}
        reports = gather_object([mine])
        if error is not None:
            raise error
        n = acc.num_processes
        for r in reports:
            if r["error"] is not None:
                kind = ConfigError if r["exit_2"] else TrainingError
                raise kind(f"rank {r['rank']} of {n} (host {r['host']}) stopped while {what}: {r['error']}")
        if identity is not None:
            ref = reports[0]["identity"]
            for r in reports[1:]:
                differ = sorted(k for k in set(ref) | set(r["identity"]) if ref.get(k) != r["identity"].get(k))
                if differ:
                    raise ConfigError(
                        f"rank {r['rank']} of {n} (host {r['host']}) sees another run than rank 0 "
                        f"({', '.join(differ)} differ): every node must read the same model, data and config "
                        "(a shared disk, or identical copies)"
                    )

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _print(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    # ------------------------------------------------------------------ data

    def _index(self, paths: list[str], skip_log: Any) -> Any:
        from lokr_trainer.data import BucketConfig, BucketSet, index_records, open_source
        from lokr_trainer.data.images import IMAGE_EXTENSIONS

        d = self.cfg.data
        records = []
        for p in paths:
            found = list(open_source(p, keep_tokens=d.keep_tokens))
            if not found:
                raise DataError(f"{p}: no images found (looked for {' '.join(sorted(IMAGE_EXTENSIONS))})")
            records.extend(found)
        buckets = BucketSet.from_config(
            BucketConfig(resolution=d.resolution, step=d.bucket_step, min_side=d.min_bucket, max_side=d.max_bucket)
        )
        return index_records(records, buckets, skip_log=skip_log, verify=d.verify_sizes,
                             progress=self.progress and self.is_main)

    def _dataset(self, index: Any, caption_cfg: Any) -> Any:
        from lokr_trainer.data import BucketDataset, ImageConfig

        d = self.cfg.data
        if self.hooks.caption is not None:
            captioner = HookedCaptioner(index.records, caption_cfg, self.cfg.train.seed, self.hooks.caption)
        else:
            captioner = Captioner(index.records, caption_cfg, seed=self.cfg.train.seed)
        return BucketDataset(index, captioner, ImageConfig(crop=d.crop, flip_prob=d.flip_prob), seed=self.cfg.train.seed)

    # ------------------------------------------------------------------ model

    def _effective_config(self) -> Any:
        """The config with what the run actually does filled in (TE adapters off when TEs are frozen)."""
        cfg = self.cfg
        if not cfg.train.train_text_encoders and tuple(cfg.lokr.components) != ("unet",):
            lokr = dataclasses.replace(cfg.lokr, components=("unet",), rules=cfg.lokr.rules)
            cfg = dataclasses.replace(cfg, lokr=lokr)
        return cfg

    def _load_models(self) -> Any:
        from lokr_trainer.sdxl import load_sdxl

        m = self.cfg.model
        models = load_sdxl(m.path, dtype=None, allow_pickle=m.allow_pickle)
        for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
            model = getattr(models, name)
            want = parse_dtype(m.vae_dtype if name == "vae" else m.dtype)
            if next(model.parameters()).dtype != want:  # diffusers warns on every .to(dtype)
                model.to(want)
        return models

    # ------------------------------------------------------------------ set-up

    def _setup(self) -> "_Run":
        """Everything a run needs, in the order that fails fastest: resume state, data, model, caches."""
        from accelerate.utils import set_seed

        from lokr_trainer.config import run_defining_dict, save_config
        from lokr_trainer.data import SkipLog
        from lokr_trainer.lokr import attach_lokr
        from lokr_trainer.train.diffusion import make_schedule_from_config
        from lokr_trainer.train.identity import data_digest, model_sha256
        from lokr_trainer.train.module import DrawSettings, SDXLTrainingModule, freeze_unreachable_adapters
        from lokr_trainer.train.optim import build_optimizer, build_scheduler
        from lokr_trainer.train.prompts import PromptEncoder
        from lokr_trainer.train.report import TrainLog, run_summary

        acc = self.accelerator
        cfg = self._effective_config()
        self.effective_config = cfg
        tc, out = cfg.train, self.output_dir
        state_root = out / STATE_DIR

        # what each rank reads from its disks (every rank gets past this point, or all stop: _agree)
        failure = identity = None
        try:
            # resume, or refuse to overwrite a run
            state = state_path = None
            if self.resume is not None:
                state_path = resolve_resume(self.resume, out)
                state = load_state(state_path)
            elif list_states(state_root):
                raise ConfigError(
                    f"train.output_dir: {out} already holds a run (states in {state_root}); "
                    "pass --resume latest to continue it, or choose another output_dir"
                )

            # data before the model: bad data fails in seconds, not after a 7 GB load
            self.skip_log = SkipLog(logger)
            index = self._index(cfg.data.path, self.skip_log)
            dataset = self._dataset(index, cfg.caption)
            plan = GlobalBatchPlan(index.bucket_ids, self.layout.global_batch, tc.seed, cfg.data.drop_incomplete)
            total_steps = tc.max_steps if tc.max_steps > 0 else tc.epochs * plan.steps_per_epoch
            digest = data_digest(index.records)
            base_hash = model_sha256(cfg.model.path, memo_dir=out / ".cache", progress=self.progress and self.is_main)
            identity = run_defining_dict(cfg, acc.num_processes)
            identity.update({"data.digest": digest, "model.sha256": base_hash, "train.total_steps": total_steps})
            if cfg.model.init_lokr:  # the starting adapter decides the weights as much as the base does
                identity["model.init_lokr_sha256"] = model_sha256(cfg.model.init_lokr, progress=False)
            start_step = 0
            if state is not None:
                check_resume_compatible(state["trainer"]["identity"], identity, state_path)
                start_step = int(state["trainer"]["step"])
        except LokrTrainerError as e:
            failure = e
        final_written = (out / "lokr.safetensors").is_file()
        self._agree(failure, "reading the model, data and training state",
                    None if identity is None else {**identity, "final adapter written": final_written})
        if start_step >= total_steps and final_written:  # resuming a finished run: nothing to load
            raise _AlreadyComplete(start_step, total_steps)
        # (all steps done but no final adapter, e.g. killed while writing it: set up, then write it)

        # model, adapters, optimizer
        models = self._load_models()
        set_seed(tc.seed)  # lycoris initialises W1 from the global RNG: same seed, same initial adapter
        network = attach_lokr(models, cfg.lokr, dtype=torch.float32)
        kept: dict = {}
        if cfg.model.init_lokr:  # a resumed state holds the trained adapter; frozen TE modules are baked again
            kept = _init_from_file(network, models, cfg.model.init_lokr, load_trained=state is None,
                                   keep_text_encoders=not tc.train_text_encoders)
            if kept:
                logger.info("model.init_lokr: %d text-encoder modules baked into the frozen text encoders "
                            "(train.train_text_encoders = false); every saved adapter carries them, untrained", len(kept))
        frozen = freeze_unreachable_adapters(network, models.text_encoder)
        if frozen:
            logger.info("%d adapters of TE1's last layer get no gradient (SDXL uses its penultimate layer): "
                        "kept at ΔW = 0", len(frozen))
        prompt_encoder = PromptEncoder(
            models.tokenizer, models.tokenizer_2, models.text_encoder, models.text_encoder_2,
            max_tokens=cfg.data.max_tokens, layout=cfg.data.prompt_layout,
        )
        d = cfg.diffusion
        module = SDXLTrainingModule(
            models.unet, models.text_encoder, models.text_encoder_2, network, prompt_encoder,
            make_schedule_from_config(models.scheduler_config, zero_terminal_snr=d.zero_terminal_snr),
            prediction=d.prediction, min_snr_gamma=d.min_snr_gamma, debiased=d.debiased_estimation,
            ip_noise_gamma=d.ip_noise_gamma, train_text_encoders=tc.train_text_encoders,
        )
        if tc.gradient_checkpointing:
            models.unet.enable_gradient_checkpointing()
            if tc.train_text_encoders:
                for te in (models.text_encoder, models.text_encoder_2):
                    te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        o, sc = cfg.optimizer, cfg.scheduler
        groups = network.param_groups(unet_lr=o.unet_lr, te1_lr=o.te1_lr, te2_lr=o.te2_lr)
        optimizer = build_optimizer(o.name, groups, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps)
        scheduler = build_scheduler(optimizer, name=sc.name, warmup_steps=sc.warmup_steps, total_steps=total_steps,
                                    min_lr_ratio=sc.min_lr_ratio)
        counters = {"images_seen": 0, "skipped_steps": 0, "bad_in_row": 0, "scaler_skips": 0}
        if state is not None:
            network.load_state_dict(_cast_like(state["adapter"], network.state_dict()))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            counters.update({k: int(v) for k, v in state["trainer"].get("counters", {}).items()})
        # the scheduler is NOT prepared: accelerate would step it once per process
        wrapped, optimizer = acc.prepare(module, optimizer)
        if state is not None:
            if state.get("scaler") is not None and acc.scaler is not None:
                acc.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
        self.network, self.models, self.module = network, models, module
        vae = models.vae.to(acc.device)

        # caches (each rank builds its share, then all wait)
        cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "cache"
        latent_cache = text_cache = None
        if cfg.data.cache_latents:
            from lokr_trainer.train.encode import LatentCache, build_latent_cache

            latent_cache = LatentCache.for_vae(cache_dir, vae, rank=self.rank)
            dataset.latent_cache = latent_cache
            build_latent_cache(dataset, vae, latent_cache, rank=self.rank, world_size=acc.num_processes,
                               num_workers=cfg.data.num_workers, skip_log=self.skip_log, progress=self.progress)
            acc.wait_for_everyone()
        if cfg.data.cache_text:
            from lokr_trainer.train.encode import TextEncoderCache, build_text_cache

            text_cache = TextEncoderCache.for_encoder(cache_dir, prompt_encoder)
            build_text_cache([dataset.captioner.fixed(r) for r in index.records], prompt_encoder, text_cache,
                             rank=self.rank, world_size=acc.num_processes, progress=self.progress)
            acc.wait_for_everyone()

        if self.is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.toml")
        summary = run_summary(cfg, self.layout, len(index), len(set(int(b) for b in index.bucket_ids)),
                              plan.steps_per_epoch, total_steps, start_step, network.summary(parse_dtype(tc.save_dtype)),
                              groups, self.skip_log.summary(), out) if self.is_main else ""
        loader = torch.utils.data.DataLoader(
            WeightedSamples(dataset),
            batch_sampler=MicroBatchSampler(plan, self.layout, self.rank, start_step, total_steps),
            collate_fn=collate_weighted,
            num_workers=cfg.data.num_workers,
            pin_memory=acc.device.type == "cuda",
        )
        metadata = {
            "lokr_trainer.config": json_dumps(cfg.to_dict()),
            "lokr_trainer.data_digest": digest,
            "lokr_trainer.base_model_sha256": base_hash,
            "lokr_trainer.global_batch": str(self.layout.global_batch),
            "ss_sd_model_name": Path(cfg.model.path).name,
            "ss_seed": str(tc.seed),
        }
        return _Run(
            cfg=cfg, plan=plan, total_steps=total_steps, start_step=start_step, identity=identity, metadata=metadata,
            models=models, network=network, module=module, wrapped=wrapped, optimizer=optimizer, scheduler=scheduler,
            groups=groups, dataset=dataset, loader=loader, vae=vae, latent_cache=latent_cache, text_cache=text_cache,
            prompt_encoder=prompt_encoder, draw=DrawSettings.from_config(d), counters=counters,
            latent_channels=int(vae.config.latent_channels),
            scaling=float(getattr(vae.config, "scaling_factor", 0.13025)),
            shift=float(getattr(vae.config, "shift_factor", None) or 0.0),
            log=TrainLog(out / "logs" if self.is_main else None), summary=summary, kept_modules=kept,
        )

    # ------------------------------------------------------------------ fit

    def fit(self) -> TrainResult:
        """Train to ``max_steps`` / ``epochs`` (or ``stop_after``, or a signal); returns what happened."""
        from tqdm.auto import tqdm

        from lokr_trainer.train.report import end_summary

        t_start = time.perf_counter()
        try:
            run = self._setup()
        except _AlreadyComplete as done:
            self._print(f"the run is already complete ({done.step}/{done.total} steps); nothing to do")
            return TrainResult(self.output_dir, self.output_dir / "lokr.safetensors", done.step, 0, done.total)
        result = TrainResult(self.output_dir, None, run.start_step, 0, run.total_steps)

        bar = None
        # The handler is in place before the summary is printed: from the moment a user sees
        # it, Ctrl-C / SIGTERM means "save at the next step boundary", never a lost run.
        with _StopRequest() as stop:
            try:
                self._print(run.summary)
                run.wrapped.train()
                run.models.unet.train()
                if run.cfg.train.train_text_encoders:
                    run.models.text_encoder.train()
                    run.models.text_encoder_2.train()
                if run.cfg.validation.every > 0 and run.start_step == 0:
                    self._validate(run, 0)  # the curve's starting point
                batches = iter(run.loader)
                bar = tqdm(total=run.total_steps, initial=run.start_step, desc="training", unit="step",
                           disable=not (self.progress and self.is_main), dynamic_ncols=True)
                window = [time.perf_counter(), 0]  # start time, images since
                for step in range(run.start_step, run.total_steps):
                    loss, grad_norm, n_real = self._step(run, step, batches)
                    window[1] += n_real
                    done = step + 1
                    result.losses.append(loss)
                    result.steps_done = done - run.start_step
                    bar.update(1)
                    if self._after_step(run, done, loss, grad_norm, result, stop, bar, window):
                        break
            finally:
                if bar is not None:
                    bar.close()
                run.log.close()
            # still under the handler: a Ctrl-C now lets the final save finish (a second one aborts it,
            # and the atomic writes leave the previous files as they were)
            if result.stopped == "done":
                if run.start_step < run.total_steps:
                    result.state = self._save_state(run, run.total_steps)
                else:
                    self._print(f"all {run.total_steps} steps were done but the final adapter is missing: "
                                "writing it from the last state")
                if self.is_main:
                    self._save_adapter(run, self.output_dir / "lokr.safetensors", run.total_steps)
                self.accelerator.wait_for_everyone()
                result.adapter = self.output_dir / "lokr.safetensors"
        result.skipped_steps = run.counters["skipped_steps"]
        result.skipped_images = self.skip_log.total
        result.seconds = time.perf_counter() - t_start
        if self.is_main and result.losses:
            print(end_summary(result, run.prompt_encoder.summary()), flush=True)
        return result

    def _step(self, run: "_Run", step: int, batches: Any) -> tuple[float, float, int]:
        """One optimizer step: accumulate its micro-batches, reduce, clip, step or skip.

        Returns the step's mean loss, the gradient norm and its number of real samples.
        """
        acc, lay, counters = self.accelerator, self.layout, run.counters
        n_real = run.plan.step(step // run.plan.steps_per_epoch, step % run.plan.steps_per_epoch).n_real
        loss_sum = torch.zeros((), device=acc.device)
        for micro in range(lay.grad_accum):
            batch = next(batches)
            self.skip_log.add_batch(batch)
            inputs = self._inputs(run, batch)
            last = micro == lay.grad_accum - 1
            with contextlib.nullcontext() if last or lay.num_processes == 1 else acc.no_sync(run.wrapped):
                per_sample = run.wrapped(inputs)
                # Σ w·ℓ · P / n: DDP's mean over ranks and the sum over micro-steps give the step's mean
                loss = (per_sample * inputs["weights"].to(per_sample.device)).sum() * (lay.num_processes / n_real)
                if self.hooks.loss is not None:
                    loss = self.hooks.loss(step, micro, loss)
                acc.backward(loss)
            loss_sum = loss_sum + loss.detach() * (n_real / lay.num_processes)
        step_loss = float((acc.reduce(loss_sum, "sum") if lay.num_processes > 1 else loss_sum) / n_real)
        max_norm = run.cfg.optimizer.max_grad_norm
        norm = acc.clip_grad_norm_(run.module.trainable_parameters(), max_norm if max_norm > 0 else math.inf)
        grad_norm = float(norm) if norm is not None else float("nan")
        if acc.scaler is not None:
            # fp16: the grad scaler skips non-finite gradients itself and lowers its scale
            run.optimizer.step()
            stepped = not acc.optimizer_step_was_skipped
            if stepped:
                run.scheduler.step()
            elif math.isfinite(step_loss):
                counters["scaler_skips"] += 1
        else:
            stepped = math.isfinite(step_loss) and math.isfinite(grad_norm)
            if stepped:
                run.optimizer.step()
                run.scheduler.step()
        if math.isfinite(step_loss) and (stepped or acc.scaler is not None):
            counters["bad_in_row"] = 0
        else:
            counters["skipped_steps"] += 1
            counters["bad_in_row"] += 1
            logger.warning("step %d: non-finite loss %s / grad norm %s: step skipped (%d in a row)",
                           step + 1, step_loss, grad_norm, counters["bad_in_row"])
        run.optimizer.zero_grad(set_to_none=True)
        counters["images_seen"] += n_real
        return step_loss, grad_norm, n_real

    def _after_step(self, run: "_Run", done: int, loss: float, grad_norm: float, result: TrainResult,
                    stop: _StopRequest, bar: Any, window: list) -> bool:
        """Logging, saving, validation, samples, stop conditions; True when the run stops here."""
        tc, counters = run.cfg.train, run.counters
        if self.hooks.after_step is not None:
            self.hooks.after_step(self, done)
        if counters["bad_in_row"] >= tc.max_bad_steps:
            states = list_states(self.output_dir / STATE_DIR)
            where = str(states[-1][1]) if states else "none was saved yet"
            raise TrainingError(
                f"{counters['bad_in_row']} non-finite steps in a row (train.max_bad_steps = {tc.max_bad_steps}) at "
                f"step {done}; the last good state is kept ({where}); lower the learning rate, or use bf16 instead of fp16"
            )
        if done % max(1, tc.log_every) == 0 or done == run.total_steps:
            dt = time.perf_counter() - window[0]
            ips = window[1] / dt if dt > 0 else 0.0
            lrs = run.scheduler.get_last_lr()
            run.log.step(done, loss=loss, grad_norm=grad_norm, lrs=lrs, groups=run.groups, images_per_second=ips,
                         counters=counters)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lrs[0]:.2e}", img_s=f"{ips:.2f}")
            window[0], window[1] = time.perf_counter(), 0
        saved = False
        if tc.save_every > 0 and done % tc.save_every == 0 and done < run.total_steps:
            if counters["bad_in_row"]:
                logger.warning("step %d was skipped: not saving a state over the last good one", done)
            else:
                if self.is_main:
                    self._save_adapter(run, self.output_dir / f"lokr-step-{done:06d}.safetensors", done)
                    _prune_snapshots(self.output_dir, tc.keep_last)
                result.state = self._save_state(run, done)
                saved = True
        if run.cfg.validation.every > 0 and done % run.cfg.validation.every == 0:
            self._validate(run, done)
        if run.cfg.sample.every > 0 and done % run.cfg.sample.every == 0:
            self._sample(run, done)
        # a stop_after the run had already reached when it was resumed is spent: resuming with the
        # saved config.toml (which keeps it) continues instead of stopping again after one step
        if run.start_step < tc.stop_after <= done < run.total_steps:
            result.stopped = "stop_after"
            message = f"stopped after step {done} (train.stop_after)"
        elif done < run.total_steps and self._stop_requested(stop):  # after the last step: just finish
            result.stopped = "signal"
            message = f"interrupted after step {done}"
        else:
            return False
        if not saved:
            result.state = self._save_state(run, done)
        self._print(f"{message}; state saved to {result.state or self.output_dir / STATE_DIR}; "
                    "continue with --resume latest")
        return True

    # ------------------------------------------------------------------ outputs

    def _save_adapter(self, run: "_Run", path: Path, step: int) -> Path:
        meta = dict(run.metadata)
        meta.update({
            "lokr_trainer.step": str(step),
            "lokr_trainer.images_seen": str(run.counters["images_seen"]),
            "ss_steps": str(step),
            "modelspec.title": f"{self.output_dir.name} step {step}",
        })
        # the trainer owns its output folder (it refuses to start over another run's states)
        if run.kept_modules:
            meta["lokr_trainer.kept_modules"] = (f"{len(run.kept_modules)} text-encoder modules copied, untrained, "
                                                 f"from {Path(run.cfg.model.init_lokr).name}")
        return run.network.save(path, dtype=run.cfg.train.save_dtype, metadata=meta, overwrite=True,
                                extra_modules=run.kept_modules)

    def _save_state(self, run: "_Run", step: int) -> Path | None:
        """All ranks call this; the main process writes (optimizer states are the same on every rank)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        if self.is_main:
            opt = getattr(run.optimizer, "optimizer", run.optimizer)  # accelerate's wrapper → the torch optimizer
            path = save_state(
                self.output_dir / STATE_DIR,
                step,
                adapter=run.network.state_dict(),
                optimizer=opt.state_dict(),
                scheduler=run.scheduler.state_dict(),
                scaler=acc.scaler.state_dict() if acc.scaler is not None else None,
                trainer={
                    "step": step,
                    "epoch": step // run.plan.steps_per_epoch,
                    "step_in_epoch": step % run.plan.steps_per_epoch,
                    "total_steps": run.total_steps,
                    "counters": run.counters,
                    "identity": run.identity,
                },
                keep_last=run.cfg.train.keep_last,
            )
        acc.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ pieces of a step

    def _inputs(self, run: "_Run", batch: dict[str, Any]) -> dict[str, Any]:
        """Latents, per-sample draws and text conditioning of one micro-batch, on the device."""
        from lokr_trainer.train.encode import fill_missing_latents
        from lokr_trainer.train.module import draw_sample, latents_from_moments

        device = self.accelerator.device
        n = batch["size"]
        if n == 0:
            return {"latents": torch.zeros(0, device=device), "weights": torch.zeros(1)}
        with torch.no_grad():
            moments = fill_missing_latents(batch, run.vae, run.dataset, run.latent_cache)
        chw = (run.latent_channels, moments.shape[-2], moments.shape[-1])
        draws = [draw_sample(self.cfg.train.seed, e, i, chw, run.draw) for e, i in zip(batch["epochs"], batch["indices"])]
        eps = torch.stack([x["latent_eps"] for x in draws]).to(device)
        latents = latents_from_moments(moments.to(device), eps, run.scaling, run.shift)
        out: dict[str, Any] = {
            "latents": latents,
            "noise": torch.stack([x["noise"] for x in draws]).to(device),
            "timesteps": torch.tensor([int(x["timestep"]) for x in draws], dtype=torch.long, device=device),
            "time_ids": batch["time_ids"].to(device),
            "weights": batch["weights"],
        }
        if "ip_noise" in draws[0]:
            out["ip_noise"] = torch.stack([x["ip_noise"] for x in draws]).to(device)
        if run.text_cache is not None:
            from lokr_trainer.train.encode import cached_text_batch

            hidden, pooled = cached_text_batch(batch["captions"], run.text_cache, run.prompt_encoder)
            out["hidden"], out["pooled"] = hidden.to(device), pooled.to(device)
        else:
            out["captions"] = batch["captions"]
        return out

    def _stop_requested(self, stop: _StopRequest) -> bool:
        flag = torch.tensor([1.0 if stop.signum is not None else 0.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, "max")  # every rank stops at the same step
        return bool(flag.item() > 0)

    # ------------------------------------------------------------------ validation, samples

    def _validate(self, run: "_Run", step: int) -> None:
        from lokr_trainer.train.validation import validation_loss

        acc = self.accelerator
        acc.wait_for_everyone()
        if self.is_main:  # on the unwrapped module: no collective inside, other ranks just wait
            if not hasattr(self, "_val_set"):
                from lokr_trainer.data import SkipLog

                index = self._index(self.cfg.validation.path, SkipLog(logger))
                fixed = dataclasses.replace(self.cfg.caption, shuffle_general=False, tag_dropout=0.0,
                                            group_dropout=0.0, caption_dropout=0.0)
                self._val_set = self._dataset(index, fixed)
            loss = validation_loss(run.module, self._val_set, run.vae, self.cfg.validation, run.scaling, run.shift,
                                   acc.device)
            logger.info("step %d: validation loss %.5f", step, loss)
            run.log.scalar("validation/loss", loss, step)
            self.validation_history.append((step, loss))
        acc.wait_for_everyone()

    def _sample(self, run: "_Run", step: int) -> None:
        from lokr_trainer.train.sampling import sample_images

        acc = self.accelerator
        acc.wait_for_everyone()
        if self.is_main:
            folder = self.output_dir / "samples" / f"step-{step:06d}"
            run.log.images(step, sample_images(run.models, run.prompt_encoder, self.cfg.sample, folder, acc.device))
        acc.wait_for_everyone()


@dataclass
class _Run:
    """The live objects of one fit() call."""

    cfg: Any
    plan: GlobalBatchPlan
    total_steps: int
    start_step: int
    identity: dict
    metadata: dict
    models: Any
    network: Any
    module: Any  # the SDXLTrainingModule itself
    wrapped: Any  # what accelerate made of it (DDP on several processes)
    optimizer: Any
    scheduler: Any
    groups: list
    dataset: Any
    loader: Any
    vae: Any
    latent_cache: Any
    text_cache: Any
    prompt_encoder: Any
    draw: Any
    counters: dict
    latent_channels: int
    scaling: float
    shift: float
    log: Any
    summary: str  # printed by fit() once Ctrl-C is handled ("" on other ranks)
    kept_modules: dict  # frozen TE modules of model.init_lokr, written untrained into every adapter


def _forget_previous_accelerator(mixed_precision: str) -> None:
    """Let a second Trainer in one process use another mixed precision (notebooks, test suites).

    accelerate keeps one process-wide ``AcceleratorState`` and refuses a new
    ``Accelerator`` whose precision differs.  Only that state is cleared; the
    process group (``PartialState``) stays.
    """
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    current = shared.get("_mixed_precision", mixed_precision)
    if shared and str(getattr(current, "value", current)) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def _init_from_file(network: Any, models: Any, path: str, *, load_trained: bool, keep_text_encoders: bool) -> dict:
    """Start from ``model.init_lokr``; any mismatch is a one-line ConfigError.

    ``load_trained``: load the modules the network trains (a resumed state holds
    them already).  ``keep_text_encoders`` (text encoders frozen): the file's TE
    modules are baked into the frozen encoders, so prompts see the published
    adapter, and are returned to be saved, untrained, with the trained ones (the
    result is then the whole published adapter with its UNet part trained on).
    """
    from lokr_trainer.errors import WrongModelError
    from lokr_trainer.lokr import LoKrFile, load_lokr
    from lokr_trainer.lokr.attach import bake_modules_into

    def text_encoder_module(name: str) -> bool:
        return name in network.table and network.table[name].component != "unet"

    f = None
    try:
        f = load_lokr(path, layout=network.table.layout, table=network.table, skip_unknown=True)
        kept = {}
        if keep_text_encoders:
            kept = {n: m for n, m in f.modules.items() if text_encoder_module(n)}
            bake_modules_into(models, kept, network.table, where=path)
            f = LoKrFile(f.path, {n: m for n, m in f.modules.items() if n not in kept}, f.metadata, f.skipped)
        if load_trained:
            network.load_state(f, strict=True)
    except WrongModelError as e:
        hint = ""
        if f is not None and not keep_text_encoders and any(
            text_encoder_module(n) and n not in network.lokr for n in f.modules
        ):
            hint = ("; or, to keep the file's text-encoder modules as they are and train the UNet only, "
                    "set train.train_text_encoders = false")
        raise ConfigError(
            f"model.init_lokr: {path}: {e.problem} (the file must hold exactly the modules and factor shapes "
            f"the [lokr] table selects: match [lokr] to the file's settings{hint})"
        ) from None
    return kept


def _attempt(fn: Callable[[], None]) -> LokrTrainerError | None:
    """Run ``fn``; the library error it raised, or ``None``."""
    try:
        fn()
    except LokrTrainerError as e:
        return e
    return None


def _cast_like(loaded: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    missing = sorted(set(current) - set(loaded))
    extra = sorted(set(loaded) - set(current))
    if missing or extra:
        raise ConfigError(
            f"the saved adapter does not fit this LoKr config (missing {missing[:3]}, unexpected {extra[:3]}); "
            "resume with the original [lokr] settings"
        )
    return {k: loaded[k].to(current[k].dtype) for k in current}


def _prune_snapshots(out: Path, keep_last: int) -> None:
    snaps = sorted(out.glob("lokr-step-*.safetensors"))
    for p in snaps[: max(0, len(snaps) - max(1, keep_last))]:
        p.unlink(missing_ok=True)


def _source_exists(spec: str) -> bool:
    import glob
    import re

    if Path(spec).exists():
        return True
    if re.search(r"\{.*\}", spec):  # brace-expanded shard pattern: check the first shard
        from lokr_trainer.data.sources import _expand_urls

        urls = _expand_urls(spec)
        return bool(urls) and Path(urls[0]).exists()
    return bool(glob.glob(spec))
