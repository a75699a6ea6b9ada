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
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lokr_trainer.errors import ConfigError, DataError, TrainingError
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

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainerHooks:
    """Extension and test points.

    ``loss(step, micro_step, loss) -> loss`` may replace a micro-batch loss
    (tests inject NaN with it); ``after_step(trainer, step)`` runs after every
    optimizer step on every rank.
    """

    loss: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None
    after_step: Callable[["Trainer", int], None] | None = None


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


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


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
        self._check_inputs()
        self.accelerator = accelerator if accelerator is not None else self._make_accelerator()
        acc = self.accelerator
        accum, global_batch = config.train.accumulation(acc.num_processes)
        self.layout = Layout(config.train.batch_size, accum, acc.num_processes)
        assert self.layout.global_batch == global_batch
        self.rank = acc.process_index
        #: (step, validation loss) pairs of this fit() call, on the main process
        self.validation_history: list[tuple[int, float]] = []

    # ------------------------------------------------------------------ checks before any model loads

    def _check_inputs(self) -> None:
        cfg = self.cfg
        model = Path(cfg.model.path)
        if not model.exists():
            raise ConfigError(f"model.path: {model} does not exist (a .safetensors file or a diffusers folder)")
        for key, paths in (("data.path", cfg.data.path), ("validation.path", cfg.validation.path)):
            for p in paths:
                if not _source_exists(p):
                    raise ConfigError(f"{key}: {p} does not exist (a folder, a .jsonl manifest or a .tar shard pattern)")
        if cfg.data.cache_latents and cfg.data.crop != "center":
            raise ConfigError("data.cache_latents needs data.crop = 'center' (random crops change every epoch)")
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

    def _make_accelerator(self) -> Any:
        from accelerate import Accelerator, DistributedDataParallelKwargs

        # TE adapters unused by a step, or module dropout, leave parameters without gradients
        find_unused = self.cfg.lokr.module_dropout > 0
        # accelerate only sets up gloo (MULTI_CPU) when told cpu=True: without it a 2-process CPU
        # launch silently runs as 2 independent single processes
        cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        try:
            return Accelerator(
                cpu=cpu,
                mixed_precision=self.cfg.train.mixed_precision,
                kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
            )
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"train.mixed_precision = {self.cfg.train.mixed_precision!r}: {e}") from None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _print(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    # ------------------------------------------------------------------ data

    def _index(self, paths: list[str], skip_log: Any) -> Any:
        from lokr_trainer.data import BucketConfig, BucketSet, index_records, open_source

        d = self.cfg.data
        records = []
        for p in paths:
            found = list(open_source(p, keep_tokens=d.keep_tokens))
            if not found:
                raise DataError(f"{p}: no images found (supported: .png .jpg .jpeg .webp .bmp ...)")
            records.extend(found)
        buckets = BucketSet.from_config(
            BucketConfig(resolution=d.resolution, step=d.bucket_step, min_side=d.min_bucket, max_side=d.max_bucket)
        )
        return index_records(records, buckets, skip_log=skip_log, progress=self.progress and self.is_main)

    def _dataset(self, index: Any, caption_cfg: Any) -> Any:
        from lokr_trainer.data import BucketDataset, Captioner, ImageConfig

        d = self.cfg.data
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
            want = DTYPES[m.vae_dtype if name == "vae" else m.dtype]
            if next(model.parameters()).dtype != want:  # diffusers warns on every .to(dtype)
                model.to(want)
        return models

    # ------------------------------------------------------------------ fit

    def fit(self) -> TrainResult:
        """Train to ``max_steps`` / ``epochs`` (or ``stop_after``, or a signal); returns what happened."""
        from lokr_trainer.config import run_defining_dict, save_config
        from lokr_trainer.data import SkipLog
        from lokr_trainer.lokr import attach_lokr
        from lokr_trainer.train.diffusion import make_schedule_from_config
        from lokr_trainer.train.identity import data_digest, model_sha256
        from lokr_trainer.train.module import DrawSettings, SDXLTrainingModule, freeze_unreachable_adapters
        from lokr_trainer.train.optim import build_optimizer, build_scheduler
        from lokr_trainer.train.prompts import PromptEncoder

        t_start = time.perf_counter()
        acc = self.accelerator
        cfg = self._effective_config()
        self.effective_config = cfg
        tc = cfg.train
        out = self.output_dir
        state_root = out / STATE_DIR

        # --- resume or refuse to overwrite ------------------------------------------------
        state = None
        if self.resume is not None:
            state_path = resolve_resume(self.resume, out)
            state = load_state(state_path)
        elif list_states(state_root):
            raise ConfigError(
                f"train.output_dir: {out} already holds a run (states in {state_root}); "
                "pass --resume latest to continue it, or choose another output_dir"
            )

        # --- data (before the model: bad data fails fast) ----------------------------------
        self.skip_log = SkipLog(logger)
        index = self._index(cfg.data.path, self.skip_log)
        dataset = self._dataset(index, cfg.caption)
        plan = GlobalBatchPlan(index.bucket_ids, self.layout.global_batch, tc.seed, cfg.data.drop_incomplete)
        total_steps = tc.max_steps if tc.max_steps > 0 else tc.epochs * plan.steps_per_epoch
        digest = data_digest(index.records)
        base_hash = model_sha256(cfg.model.path, memo_dir=out / ".cache", progress=self.progress and self.is_main)
        identity = run_defining_dict(cfg, acc.num_processes)
        identity.update({"data.digest": digest, "model.sha256": base_hash, "train.total_steps": total_steps})
        start_step = 0
        if state is not None:
            check_resume_compatible(state["trainer"]["identity"], identity, state_path)
            start_step = int(state["trainer"]["step"])

        # --- model -------------------------------------------------------------------------
        models = self._load_models()
        from accelerate.utils import set_seed

        set_seed(tc.seed)  # lycoris initialises W1 from the global RNG: same seed, same initial adapter
        network = attach_lokr(models, cfg.lokr, dtype=torch.float32)
        prompt_encoder = PromptEncoder(
            models.tokenizer,
            models.tokenizer_2,
            models.text_encoder,
            models.text_encoder_2,
            max_tokens=cfg.data.max_tokens,
            layout=cfg.data.prompt_layout,
        )
        schedule = make_schedule_from_config(models.scheduler_config, zero_terminal_snr=cfg.diffusion.zero_terminal_snr)
        d = cfg.diffusion
        module = SDXLTrainingModule(
            models.unet,
            models.text_encoder,
            models.text_encoder_2,
            network,
            prompt_encoder,
            schedule,
            prediction=d.prediction,
            min_snr_gamma=d.min_snr_gamma,
            debiased=d.debiased_estimation,
            ip_noise_gamma=d.ip_noise_gamma,
            train_text_encoders=tc.train_text_encoders,
        )
        if tc.gradient_checkpointing:
            models.unet.enable_gradient_checkpointing()
            if tc.train_text_encoders:
                for te in (models.text_encoder, models.text_encoder_2):
                    te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        frozen = freeze_unreachable_adapters(network, models.text_encoder)
        if frozen:
            logger.info("%d TE1 adapters of its last layer get no gradient (SDXL uses TE1's penultimate layer): kept at ΔW = 0", len(frozen))
        o = cfg.optimizer
        groups = network.param_groups(unet_lr=o.unet_lr, te1_lr=o.te1_lr, te2_lr=o.te2_lr)
        optimizer = build_optimizer(o.name, groups, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps)
        sched_cfg = cfg.scheduler
        scheduler = build_scheduler(
            optimizer,
            name=sched_cfg.name,
            warmup_steps=sched_cfg.warmup_steps,
            total_steps=total_steps,
            min_lr_ratio=sched_cfg.min_lr_ratio,
        )
        counters = {"images_seen": 0, "skipped_steps": 0, "bad_in_row": 0, "scaler_skips": 0}
        if state is not None:
            network.load_state_dict(_cast_like(state["adapter"], network.state_dict()))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            counters.update({k: int(v) for k, v in state["trainer"].get("counters", {}).items()})
        module, optimizer = acc.prepare(module, optimizer)
        if state is not None:
            if state.get("scaler") is not None and acc.scaler is not None:
                acc.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
        core = acc.unwrap_model(module)
        self.network, self.models, self.module = network, models, core
        vae = models.vae.to(acc.device)

        # --- caches --------------------------------------------------------------------------
        cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "cache"
        latent_cache = text_cache = None
        if cfg.data.cache_latents:
            from lokr_trainer.train.encode import LatentCache, build_latent_cache

            latent_cache = LatentCache.for_vae(cache_dir, vae, rank=self.rank)
            dataset.latent_cache = latent_cache
            build_latent_cache(
                dataset, vae, latent_cache, rank=self.rank, world_size=acc.num_processes,
                num_workers=cfg.data.num_workers, skip_log=self.skip_log, progress=self.progress,
            )
            acc.wait_for_everyone()
        if cfg.data.cache_text:
            from lokr_trainer.train.encode import TextEncoderCache, build_text_cache

            text_cache = TextEncoderCache.for_encoder(cache_dir, prompt_encoder)
            captions = [dataset.captioner.fixed(r) for r in index.records]
            build_text_cache(captions, prompt_encoder, text_cache, rank=self.rank, world_size=acc.num_processes, progress=self.progress)
            acc.wait_for_everyone()

        # --- outputs and summary ---------------------------------------------------------------
        if self.is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.toml")
        summary = network.summary(DTYPES[tc.save_dtype])
        self._print_summary(cfg, index, plan, total_steps, start_step, summary, groups)
        writer = self._tensorboard(out) if self.is_main else None

        loader = torch.utils.data.DataLoader(
            WeightedSamples(dataset),
            batch_sampler=MicroBatchSampler(plan, self.layout, self.rank, start_step, total_steps),
            collate_fn=collate_weighted,
            num_workers=cfg.data.num_workers,
            pin_memory=acc.device.type == "cuda",
            persistent_workers=False,
        )
        draw = DrawSettings.from_config(d)
        scaling = float(getattr(vae.config, "scaling_factor", 0.13025))
        shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        latent_channels = int(vae.config.latent_channels)
        from lokr_trainer.train.encode import vae_scale_factor

        down = vae_scale_factor(vae)

        meta_base = {
            "lokr_trainer.config": json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":")),
            "lokr_trainer.data_digest": digest,
            "lokr_trainer.base_model_sha256": base_hash,
            "lokr_trainer.global_batch": str(self.layout.global_batch),
            "ss_sd_model_name": Path(cfg.model.path).name,
            "ss_seed": str(tc.seed),
        }

        def save_adapter(path: Path, step: int) -> Path:
            meta = dict(meta_base)
            meta.update(
                {
                    "lokr_trainer.step": str(step),
                    "lokr_trainer.images_seen": str(counters["images_seen"]),
                    "ss_steps": str(step),
                    "modelspec.title": f"{out.name} step {step}",
                }
            )
            return network.save(path, dtype=DTYPES[tc.save_dtype], metadata=meta)

        def save_training_state(step: int) -> Path | None:
            acc.wait_for_everyone()
            path = None
            if self.is_main:
                path = save_state(
                    state_root,
                    step,
                    adapter=network.state_dict(),
                    optimizer=optimizer.optimizer.state_dict() if hasattr(optimizer, "optimizer") else optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    scaler=acc.scaler.state_dict() if acc.scaler is not None else None,
                    trainer={
                        "step": step,
                        "epoch": step // plan.steps_per_epoch,
                        "step_in_epoch": step % plan.steps_per_epoch,
                        "total_steps": total_steps,
                        "counters": counters,
                        "identity": identity,
                    },
                    keep_last=tc.keep_last,
                )
            acc.wait_for_everyone()
            return path

        result = TrainResult(out, None, start_step, 0, total_steps)
        if start_step >= total_steps:
            self._print(f"the run is already complete ({start_step}/{total_steps} steps); nothing to do")
            final = out / "lokr.safetensors"
            result.adapter = final if final.is_file() else None
            return result

        # --- the loop -------------------------------------------------------------------------
        from tqdm.auto import tqdm

        params = core.trainable_parameters()
        module.train()
        models.unet.train()
        if tc.train_text_encoders:
            models.text_encoder.train()
            models.text_encoder_2.train()
        if cfg.validation.every > 0 and start_step == 0:
            self._validate(0, writer, vae, prompt_encoder, scaling, shift)  # the curve's starting point
        it = iter(loader)
        bar = tqdm(
            total=total_steps, initial=start_step, desc="training", unit="step",
            disable=not (self.progress and self.is_main), dynamic_ncols=True,
        )
        t_window, imgs_window = time.perf_counter(), 0
        step = start_step
        with _StopRequest() as stop:
            try:
                for step in range(start_step, total_steps):
                    samples = plan.step(step // plan.steps_per_epoch, step % plan.steps_per_epoch)
                    n_real = samples.n_real
                    loss_sum = torch.zeros((), device=acc.device)
                    for micro in range(self.layout.grad_accum):
                        batch = next(it)
                        self.skip_log.add_batch(batch)
                        inputs = self._inputs(batch, vae, dataset, latent_cache, text_cache, prompt_encoder, draw,
                                              (latent_channels, down), scaling, shift)
                        last = micro == self.layout.grad_accum - 1
                        ctx = contextlib.nullcontext() if last or acc.num_processes == 1 else acc.no_sync(module)
                        with ctx:
                            per_sample = module(inputs)
                            weighted = (per_sample * inputs["weights"].to(per_sample.device)).sum()
                            loss = weighted * (acc.num_processes / n_real)
                            if self.hooks.loss is not None:
                                loss = self.hooks.loss(step, micro, loss)
                            acc.backward(loss)
                        loss_sum = loss_sum + loss.detach() * (n_real / acc.num_processes)
                    step_loss = (acc.reduce(loss_sum, "sum") if acc.num_processes > 1 else loss_sum) / n_real
                    grad_norm = acc.clip_grad_norm_(params, o.max_grad_norm if o.max_grad_norm > 0 else math.inf)
                    loss_v = float(step_loss)
                    gn = float(grad_norm) if grad_norm is not None else float("nan")
                    finite_loss = math.isfinite(loss_v)
                    if finite_loss and (math.isfinite(gn) or acc.scaler is not None):
                        optimizer.step()
                        if acc.optimizer_step_was_skipped:
                            counters["scaler_skips"] += 1  # fp16 overflow: the scaler lowers its scale
                        else:
                            scheduler.step()
                        counters["bad_in_row"] = 0
                    else:
                        counters["skipped_steps"] += 1
                        counters["bad_in_row"] += 1
                        logger.warning("step %d: non-finite loss %s / grad norm %s: step skipped (%d in a row)",
                                       step + 1, loss_v, gn, counters["bad_in_row"])
                    optimizer.zero_grad(set_to_none=True)
                    counters["images_seen"] += n_real
                    imgs_window += n_real
                    result.losses.append(loss_v)
                    done = step + 1
                    result.steps_done = done - start_step
                    if self.hooks.after_step is not None:
                        self.hooks.after_step(self, done)
                    if counters["bad_in_row"] >= tc.max_bad_steps:
                        last_state = list_states(state_root)
                        where = str(last_state[-1][1]) if last_state else "none was saved yet"
                        raise TrainingError(
                            f"{counters['bad_in_row']} non-finite steps in a row (train.max_bad_steps = "
                            f"{tc.max_bad_steps}) at step {done}; the last good state is kept ({where}); "
                            "lower the learning rate, or use bf16 instead of fp16"
                        )
                    lr = scheduler.get_last_lr()
                    bar.update(1)
                    if writer is not None and (done % max(1, tc.log_every) == 0 or done == total_steps):
                        dt = time.perf_counter() - t_window
                        ips = imgs_window / dt if dt > 0 else 0.0
                        self._log(writer, done, loss_v, gn, lr, groups, ips, counters)
                        bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr[0]:.2e}", img_s=f"{ips:.2f}")
                        t_window, imgs_window = time.perf_counter(), 0
                    saved_state = False
                    if counters["bad_in_row"] and tc.save_every > 0 and done % tc.save_every == 0:
                        logger.warning("step %d was skipped: not saving a state over the last good one", done)
                    elif tc.save_every > 0 and done % tc.save_every == 0 and done < total_steps:
                        if self.is_main:
                            save_adapter(out / f"lokr-step-{done:06d}.safetensors", done)
                            _prune_snapshots(out, tc.keep_last)
                        result.state = save_training_state(done)
                        saved_state = True
                    if cfg.validation.every > 0 and done % cfg.validation.every == 0:
                        self._validate(done, writer, vae, prompt_encoder, scaling, shift)
                    if cfg.sample.every > 0 and done % cfg.sample.every == 0:
                        self._sample(done, writer)
                    if 0 < tc.stop_after <= done < total_steps:
                        if not saved_state:
                            result.state = save_training_state(done)
                        result.stopped = "stop_after"
                        self._print(f"stopped after step {done} (train.stop_after); continue with --resume latest")
                        break
                    if self._stop_requested(stop):
                        if not saved_state:
                            result.state = save_training_state(done)
                        result.stopped = "signal"
                        self._print(f"interrupted after step {done}; state saved to {result.state or state_root}; "
                                    "continue with --resume latest")
                        break
            finally:
                bar.close()
        if result.stopped == "done":
            result.state = save_training_state(total_steps)
            if self.is_main:
                result.adapter = save_adapter(out / "lokr.safetensors", total_steps)
            acc.wait_for_everyone()
            result.adapter = out / "lokr.safetensors"
        if writer is not None:
            writer.close()
        result.skipped_steps = counters["skipped_steps"]
        result.skipped_images = self.skip_log.total
        result.seconds = time.perf_counter() - t_start
        self._print_end(result, prompt_encoder)
        return result

    # ------------------------------------------------------------------ pieces of a step

    def _inputs(
        self,
        batch: dict[str, Any],
        vae: Any,
        dataset: Any,
        latent_cache: Any,
        text_cache: Any,
        prompt_encoder: Any,
        draw: Any,
        latent_geom: tuple[int, int],
        scaling: float,
        shift: float,
    ) -> dict[str, Any]:
        """Latents, per-sample draws and text conditioning of one micro-batch, on the device."""
        from lokr_trainer.train.encode import fill_missing_latents
        from lokr_trainer.train.module import draw_sample, latents_from_moments

        device = self.accelerator.device
        n = batch["size"]
        if n == 0:
            return {"latents": torch.zeros(0, device=device), "weights": torch.zeros(1)}
        with torch.no_grad():
            moments = fill_missing_latents(batch, vae, dataset, latent_cache)
        chw = (latent_geom[0], moments.shape[-2], moments.shape[-1])
        draws = [
            draw_sample(self.cfg.train.seed, e, i, chw, draw) for e, i in zip(batch["epochs"], batch["indices"])
        ]
        eps = torch.stack([x["latent_eps"] for x in draws]).to(device)
        latents = latents_from_moments(moments.to(device), eps, scaling, shift)
        out: dict[str, Any] = {
            "latents": latents,
            "noise": torch.stack([x["noise"] for x in draws]).to(device),
            "timesteps": torch.tensor([int(x["timestep"]) for x in draws], dtype=torch.long, device=device),
            "time_ids": batch["time_ids"].to(device),
            "weights": batch["weights"],
        }
        if "ip_noise" in draws[0]:
            out["ip_noise"] = torch.stack([x["ip_noise"] for x in draws]).to(device)
        if text_cache is not None:
            from lokr_trainer.train.encode import cached_text_batch

            hidden, pooled = cached_text_batch(batch["captions"], text_cache, prompt_encoder)
            out["hidden"], out["pooled"] = hidden.to(device), pooled.to(device)
        else:
            out["captions"] = batch["captions"]
        return out

    def _stop_requested(self, stop: _StopRequest) -> bool:
        flag = torch.tensor([1.0 if stop.signum is not None else 0.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, "max")  # every rank stops at the same step
        return bool(flag.item() > 0)

    # ------------------------------------------------------------------ logging, validation, samples

    def _tensorboard(self, out: Path) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            logger.warning("tensorboard is not installed: no training logs (pip install tensorboard)")
            return None
        return SummaryWriter(str(out / "logs"))

    @staticmethod
    def _log(writer: Any, step: int, loss: float, gn: float, lr: list[float], groups: list[dict], ips: float, counters: dict) -> None:
        writer.add_scalar("train/loss", loss, step)
        if math.isfinite(gn):
            writer.add_scalar("train/grad_norm", gn, step)
        for g, value in zip(groups, lr):
            writer.add_scalar(f"lr/{g.get('name', 'group')}", value, step)
        writer.add_scalar("train/images_per_second", ips, step)
        writer.add_scalar("train/skipped_steps", counters["skipped_steps"], step)
        writer.add_scalar("train/images_seen", counters["images_seen"], step)

    def _validate(self, step: int, writer: Any, vae: Any, prompt_encoder: Any, scaling: float, shift: float) -> None:
        from lokr_trainer.train.validation import validation_loss

        acc = self.accelerator
        acc.wait_for_everyone()
        if self.is_main:
            if not hasattr(self, "_val_set"):
                from lokr_trainer.data import SkipLog

                index = self._index(self.cfg.validation.path, SkipLog(logger))
                fixed = dataclasses.replace(self.cfg.caption, shuffle_general=False, tag_dropout=0.0, group_dropout=0.0, caption_dropout=0.0)
                self._val_set = self._dataset(index, fixed)
            loss = validation_loss(self.module, self._val_set, vae, self.cfg.validation, scaling, shift, acc.device)
            logger.info("step %d: validation loss %.5f", step, loss)
            if writer is not None:
                writer.add_scalar("validation/loss", loss, step)
            self.validation_history.append((step, loss))
        acc.wait_for_everyone()

    def _sample(self, step: int, writer: Any) -> None:
        from lokr_trainer.train.sampling import sample_images

        acc = self.accelerator
        acc.wait_for_everyone()
        if self.is_main:
            paths = sample_images(self.models, self.module.prompt_encoder, self.cfg.sample, self.output_dir / "samples" / f"step-{step:06d}", acc.device)
            if writer is not None:
                import numpy as np
                from PIL import Image

                for i, p in enumerate(paths):
                    writer.add_image(f"samples/{i}", np.asarray(Image.open(p).convert("RGB")), step, dataformats="HWC")
        acc.wait_for_everyone()

    def _print_summary(self, cfg: Any, index: Any, plan: GlobalBatchPlan, total: int, start: int, summary: Any, groups: list[dict]) -> None:
        if not self.is_main:
            return
        lay, tc = self.layout, cfg.train
        spe = plan.steps_per_epoch
        per = {c: summary.component(c).parameters for c in ("unet", "te1", "te2")}
        buckets = len(set(int(b) for b in index.bucket_ids))
        lrs = ", ".join(f"{g['name']} {g['lr']:.2e}" for g in groups)
        lines = [
            f"lokr_trainer: LoKr on {cfg.model.path} ({cfg.model.dtype} base, mixed precision {tc.mixed_precision})",
            f"  data         {len(index):,} images in {buckets} buckets from {', '.join(cfg.data.path)} ({self.skip_log.summary()})",
            f"  global batch {lay.global_batch} = batch {lay.batch_size} x accumulation {lay.grad_accum} x processes {lay.num_processes}",
            f"  steps        {total} optimizer steps ({total / spe:.2f} epochs of {spe} steps)"
            + (f", resuming at step {start}" if start else ""),
            f"  trainable    {_fmt_count(summary.parameters)} parameters in {summary.modules} modules "
            f"(unet {_fmt_count(per['unet'])}, te1 {_fmt_count(per['te1'])}, te2 {_fmt_count(per['te2'])})",
            f"  adapter file {summary.file_bytes / 1e6:.1f} MB ({tc.save_dtype})",
            f"  optimizer    {cfg.optimizer.name}: {lrs}; {cfg.scheduler.name}, warmup {cfg.scheduler.warmup_steps} steps",
            f"  outputs      {self.output_dir}/ (config.toml, lokr.safetensors, state/, logs/"
            + (", samples/" if cfg.sample.every else "")
            + ")",
        ]
        print("\n".join(lines), flush=True)

    def _print_end(self, result: TrainResult, prompt_encoder: Any) -> None:
        if not self.is_main or not result.losses:
            return
        finite = [x for x in result.losses if math.isfinite(x)]
        k = max(1, len(finite) // 10)
        first = sum(finite[:k]) / k if finite else float("nan")
        last = sum(finite[-k:]) / k if finite else float("nan")
        print(
            f"trained {result.steps_done} steps in {result.seconds:.1f} s: loss {first:.4f} -> {last:.4f} "
            f"(mean of first/last {k}); {result.skipped_steps} steps skipped, {result.skipped_images} images skipped; "
            f"{prompt_encoder.summary()}",
            flush=True,
        )
        if result.adapter is not None:
            print(f"adapter: {result.adapter}", flush=True)


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
