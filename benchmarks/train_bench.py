"""Cost of one LoKr training step: ours against the kohya/SimpleTuner default, full-size CPU, GPU.

    python benchmarks/train_bench.py --part cpu-compare [--repeat 3] [--threads 2] [--latent 64]
    python benchmarks/train_bench.py --part cpu-fullsize [--dir DIR] [--keep] [--steps 2]
    python benchmarks/train_bench.py --part gpu [--peak-tflops 989] [--batch 4] [--resolution 1024]
    python benchmarks/train_bench.py --smoke          # cpu-compare on the tiny model, seconds

``cpu-compare``: a mid-size SDXL-shaped UNet (SDXL's 320- and 640-channel
levels, two transformer layers, SDXL conditioning sizes; ~220M parameters)
with the ``kohaku-xl-delta`` LoKr on it, fp32, batch 1, 64x64 latent (512²),
one full step (forward, backward, grad clip, AdamW), three variants run
round-robin (A B C A B C …) so that a busy spell on the shared machine hits
all alike:

* **ours**: what ``Trainer`` runs: latents drawn from cached VAE moments,
  cached text embeddings, LoKr forward ``auto`` (per-layer choice);
* **reference**: kohya's / SimpleTuner's default: LyCORIS' rebuilt-ΔW forward
  (``rebuild``) and the SDXL VAE (full size, random init, fp32, ``no_grad``)
  encoding the 512² image every step;
* **rebuild, cached**: the reference without its VAE encode, so the table
  splits the gain into the forward-mode part and the caching part.

The first round runs every variant at learning rate 0 (a full step that
leaves the adapter unchanged): it is the warm-up, and since all variants then
see the same weights and inputs it checks that they give the same loss and
the same adapter gradients.  Times are medians of ``--repeat`` rounds.

``cpu-fullsize``: a full-size random SDXL (``write_random_sdxl``, 7 GB fp16,
written once into ``--dir``) trained through the real ``Trainer`` (bf16 base,
bf16 autocast, gradient checkpointing, cached latents, ``kohaku-xl-delta`` on
the UNet and both text encoders, Lion8bit as in the Delta recipe (``--optimizer
adamw`` adds 2.9 GB of fp32 state and goes past 16 GB), 256², batch 1) on two
generated images, in a child process so that its peak RSS is its own.

``gpu``: full-size SDXL built on the GPU (random init), 1024², batch 4,
``kohaku-xl-delta`` on UNet + both TEs (captions encoded by the trained TEs),
cached-latent style random latents, gradient checkpointing, bf16 and fp16
(fp16 base weights, grad scaler): images/s, peak VRAM and model FLOP
utilisation.  Without CUDA it says so and exits 0.

Writes nothing into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch

#: The mid-size UNet: SDXL's first two levels (320 ResNet-only, 640 with 2 transformer layers of
#: 10 heads), SDXL's cross-attention width (2048) and pooled/time conditioning (2816).
MID_UNET_CHANGES: dict[str, Any] = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640],
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [5, 10],
}

#: One SDXL UNet forward on a 1024² sample (DESIGN.md §9); a training step is ~3x that.
UNET_FLOP_1024 = 6.76e12

GiB = 1024**3


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def _mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def _quiet() -> None:
    import logging

    from lokr_trainer.quiet import quiet_bitsandbytes

    quiet_bitsandbytes()
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ==================================================================================== part 1


class CompareBench:
    """One UNet, one LoKr network, one optimizer; a step in any of the three variants."""

    VARIANTS = {
        # name: (forward mode, VAE encode in the step)
        "ours": ("auto", False),
        "reference": ("rebuild", True),
        "rebuild, cached": ("rebuild", False),
    }

    def __init__(self, smoke: bool, latent: int, seed: int = 0) -> None:
        from lokr_trainer.lokr import attach_lokr
        from lokr_trainer.lokr.targets import LoKrConfig
        from lokr_trainer.sdxl import configs
        from lokr_trainer.sdxl.load import _quiet_transformers, build_unet, build_vae
        from lokr_trainer.testing import build_tiny_sdxl
        from lokr_trainer.train.diffusion import make_schedule_from_config
        from lokr_trainer.train.encode import encode_moments, vae_scale_factor
        from lokr_trainer.train.module import DrawSettings, SDXLTrainingModule
        from lokr_trainer.train.optim import build_optimizer
        from lokr_trainer.train.prompts import make_time_ids

        self.seed = seed
        models = build_tiny_sdxl(seed)  # tiny TEs: only their layer counts matter (text comes cached)
        if not smoke:
            torch.manual_seed(seed)
            with _quiet_transformers():
                models.unet = build_unet({**configs.SDXL_UNET_CONFIG, **MID_UNET_CHANGES})
                models.vae = build_vae(configs.SDXL_VAE_CONFIG)
        self.models = models
        unet, vae = models.unet, models.vae
        vae.eval()
        torch.manual_seed(seed)  # lycoris draws W1 from the global RNG
        self.network = attach_lokr(models, LoKrConfig.from_preset("kohaku-xl-delta", components=("unet",)))
        schedule = make_schedule_from_config(models.scheduler_config)
        self.module = SDXLTrainingModule(
            unet, models.text_encoder, models.text_encoder_2, self.network, None, schedule,
            min_snr_gamma=5.0, train_text_encoders=False,
        )
        unet.train()
        self.params = self.module.trainable_parameters()
        self.optimizer = build_optimizer(
            "adamw", self.network.param_groups(lr=1e-4), weight_decay=0.01, betas=(0.9, 0.999)
        )
        self.draw = DrawSettings()
        self.scaling = float(vae.config.scaling_factor)
        self.channels = int(unet.config.in_channels)
        self.latent = latent
        side = latent * vae_scale_factor(vae)
        self.image_side = side
        g = torch.Generator().manual_seed(seed + 1)
        self.pixels = torch.rand((1, 3, side, side), generator=g) * 2 - 1
        self.moments = encode_moments(vae, self.pixels)  # the latent cache
        cfg = unet.config
        pooled_dim = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
        self.hidden = torch.randn((1, 77, int(cfg.cross_attention_dim)), generator=g)  # the text cache
        self.pooled = torch.randn((1, pooled_dim), generator=g)
        self.time_ids = make_time_ids([(side, side)], [(0, 0)], [(side, side)])
        self.unet_params = sum(p.numel() for p in unet.parameters())
        self.vae_params = sum(p.numel() for p in vae.parameters())
        self.adapter_params = sum(p.numel() for p in self.params)

    def auto_modes(self) -> Counter:
        self.network.set_forward_mode("auto")
        return Counter(self.network.forward_modes(training=True).values())

    def step(self, variant: str, index: int) -> dict[str, Any]:
        """One optimizer step; returns its wall time, the VAE part of it, the loss."""
        from lokr_trainer.train.module import draw_sample, latents_from_moments

        mode, encode = self.VARIANTS[variant]
        self.network.set_forward_mode(mode)
        t0 = time.perf_counter()
        d = draw_sample(self.seed, 0, index, (self.channels, self.latent, self.latent), self.draw)
        t_vae = 0.0
        if encode:
            with torch.no_grad():
                moments = self.models.vae.encode(self.pixels).latent_dist.parameters
            t_vae = time.perf_counter() - t0
        else:
            moments = self.moments
        batch = {
            "latents": latents_from_moments(moments, d["latent_eps"][None], self.scaling),
            "noise": d["noise"][None],
            "timesteps": torch.tensor([int(d["timestep"])]),
            "time_ids": self.time_ids,
            "hidden": self.hidden,
            "pooled": self.pooled,
        }
        loss = self.module(batch).mean()
        loss.backward()
        grads = None
        if self._keep_grads:
            grads = torch.cat([p.grad.detach().flatten() for p in self.params])
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"s": time.perf_counter() - t0, "vae_s": t_vae, "loss": float(loss.detach()), "grads": grads}

    _keep_grads = False

    def warmup_check(self) -> dict[str, Any]:
        """Every variant once at lr 0 (weights unchanged): same loss and gradients expected."""
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["lr"] = 0.0
        self._keep_grads = True
        try:
            runs = {v: self.step(v, 0) for v in self.VARIANTS}
        finally:
            self._keep_grads = False
            for g, lr in zip(self.optimizer.param_groups, lrs):
                g["lr"] = lr
        ref = runs["ours"]
        scale = float(ref["grads"].abs().max()) or 1.0
        out = {"loss": {v: r["loss"] for v, r in runs.items()}, "loss_diff": 0.0, "grad_rel_diff": 0.0}
        for v, r in runs.items():
            out["loss_diff"] = max(out["loss_diff"], abs(r["loss"] - ref["loss"]))
            out["grad_rel_diff"] = max(out["grad_rel_diff"], float((r["grads"] - ref["grads"]).abs().max()) / scale)
        out["grad_max"] = scale
        return out


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    """Part 1 (``--smoke``: the tiny model); prints the table, returns the figures."""
    _quiet()
    smoke = bool(args.smoke)
    latent = args.latent if args.latent else (16 if smoke else 64)
    repeat = 1 if smoke and args.repeat is None else (args.repeat or 3)
    t = time.perf_counter()
    bench = CompareBench(smoke, latent)
    setup_s = time.perf_counter() - t
    modes = bench.auto_modes()
    what = "tiny SDXL (smoke)" if smoke else "mid-size SDXL-shaped UNet " + json.dumps(MID_UNET_CHANGES["block_out_channels"])
    print(f"\npart cpu-compare: {what}, fp32, batch 1, latent {latent}x{latent} (image {bench.image_side}²), "
          f"{torch.get_num_threads()} threads")
    print(f"  UNet {bench.unet_params / 1e6:.1f} M params; kohaku-xl-delta on the UNet: {len(bench.network)} modules, "
          f"{bench.adapter_params / 1e6:.2f} M trainable; VAE {bench.vae_params / 1e6:.1f} M params "
          f"({'tiny' if smoke else 'SDXL size'}); set up in {setup_s:.0f} s")
    print(f"  auto forward picks (training): {', '.join(f'{m} {n}' for m, n in sorted(modes.items()))}")
    load0 = os.getloadavg()[0]
    if load0 > 0.5 + os.cpu_count() / 2 and not smoke:
        print(f"  WARNING: load average {load0:.2f} on {os.cpu_count()} cores: other jobs are running, times are unreliable "
              "(OpenMP threads slow down many-fold when the cores are oversubscribed)")
    check = bench.warmup_check()
    print(f"  warm-up at lr 0: loss {', '.join(f'{v} {x:.6f}' for v, x in check['loss'].items())}; "
          f"max |Δloss| {check['loss_diff']:.1e}, adapter grads max rel diff {check['grad_rel_diff']:.1e}")
    times: dict[str, list[float]] = {v: [] for v in bench.VARIANTS}
    vae_times: list[float] = []
    for rnd in range(1, repeat + 1):
        for v in bench.VARIANTS:
            r = bench.step(v, rnd)
            times[v].append(r["s"])
            if r["vae_s"]:
                vae_times.append(r["vae_s"])
    load1 = os.getloadavg()[0]
    med = {v: statistics.median(x) for v, x in times.items()}
    vae_med = statistics.median(vae_times)
    ref = med["reference"]
    labels = {
        "ours": "ours: auto forward, cached latents",
        "reference": "reference: rebuild forward + VAE encode",
        "rebuild, cached": "rebuild forward, cached latents",
    }
    print(f"\n{'variant':<42} {'s/step':>8} {'x ref':>7}   all runs")
    for v in bench.VARIANTS:
        runs = " ".join(f"{x:.2f}" for x in times[v])
        print(f"{labels[v]:<42} {med[v]:>8.3f} {med[v] / ref:>7.2f}   {runs}")
    print(f"{'  of which VAE encode (reference)':<42} {vae_med:>8.3f} {vae_med / ref:>7.2f}")
    ratio = med["ours"] / ref
    fwd_ratio = med["ours"] / med["rebuild, cached"]
    cache_ratio = med["rebuild, cached"] / ref
    rounds = [a / b for a, b in zip(times["ours"], times["reference"])]
    print(f"\nratio ours/reference = {ratio:.2f} (target <= 0.6); per round {' '.join(f'{x:.2f}' for x in rounds)}")
    rounds = [a / b for a, b in zip(times["ours"], times["rebuild, cached"])]
    print(f"  forward-mode effect alone (ours / rebuild cached) = {fwd_ratio:.2f}; per round {' '.join(f'{x:.2f}' for x in rounds)}")
    print(f"  latent-cache effect alone (rebuild cached / reference) = {cache_ratio:.2f}")
    print(f"median of {repeat} interleaved rounds after the lr-0 warm-up round; load average {load0:.2f} -> {load1:.2f}; "
          f"peak RSS {_peak_rss_bytes() / GiB:.2f} GiB")
    return {
        "latent": latent, "repeat": repeat, "unet_params": bench.unet_params, "adapter_params": bench.adapter_params,
        "modules": len(bench.network), "modes": dict(modes), "check": {k: v for k, v in check.items()}, "times": times, "median": med,
        "vae_s": vae_med, "ratio": ratio, "forward_ratio": fwd_ratio, "cache_ratio": cache_ratio,
    }


# ==================================================================================== part 2


def _write_images(folder: Path, n: int, side: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    for i in range(n):
        base = rng.uniform(40, 220, size=3).astype(np.float32)
        img = base[None, None, :] * (0.7 + 0.3 * yy[..., None]) + 30 * np.sin(8 * xx + i)[..., None]
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img_{i:03d}.png")
        (folder / f"img_{i:03d}.txt").write_text(f"a smooth colour field number {i}, simple_background\n")


def fullsize_config(model: Path, images: Path, out: Path, steps: int, resolution: int, optimizer: str = "lion8bit") -> dict[str, Any]:
    return {
        "model": {"path": str(model), "dtype": "bf16"},
        "lokr": {"preset": "kohaku-xl-delta"},
        "data": {"path": [str(images)], "resolution": resolution, "min_bucket": resolution, "max_bucket": resolution,
                 "bucket_step": 64, "num_workers": 0, "cache_latents": True},
        "diffusion": {"min_snr_gamma": 5.0},
        "optimizer": {"name": optimizer, "unet_lr": 4e-5, "te1_lr": 1e-5, "te2_lr": 1e-5, "weight_decay": 0.1,
                      "betas": [0.9, 0.95]},
        "train": {"output_dir": str(out), "batch_size": 1, "max_steps": steps, "mixed_precision": "bf16",
                  "gradient_checkpointing": True, "train_text_encoders": True, "log_every": 1, "save_dtype": "fp16"},
    }


def fullsize_child(config_path: str) -> int:
    """Run ``Trainer.fit`` on the config; print one ``RESULT {json}`` line."""
    _quiet()
    from lokr_trainer.config import RunConfig
    from lokr_trainer.train.loop import Trainer, TrainerHooks

    marks: dict[str, Any] = {"step_end": []}

    def on_loss(step: int, micro: int, loss: torch.Tensor) -> torch.Tensor:
        marks.setdefault("first_forward", time.perf_counter())
        return loss

    def after_step(trainer: Any, step: int) -> None:
        marks["step_end"].append(time.perf_counter())
        marks.setdefault("peak_by_step", []).append(_peak_rss_bytes())

    cfg = RunConfig.from_dict(json.loads(Path(config_path).read_text()))
    t0 = time.perf_counter()
    result = Trainer(cfg, hooks=TrainerHooks(loss=on_loss, after_step=after_step), progress=False).fit()
    ends = marks["step_end"]
    steady = [b - a for a, b in zip(ends, ends[1:])]
    out = {
        "steps": len(ends),
        "first_forward_s": marks.get("first_forward", t0) - t0,
        "first_step_s": (ends[0] - t0) if ends else None,
        "steady_s": steady,
        "fit_s": result.seconds,
        "losses": result.losses,
        "peak_rss": _peak_rss_bytes(),
        "peak_rss_by_step": marks.get("peak_by_step", []),
        "threads": torch.get_num_threads(),
    }
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def run_fullsize(args: argparse.Namespace) -> int:
    need = 18 * GiB
    avail = _mem_available_bytes()
    if 0 <= avail < need:
        print(f"part cpu-fullsize: skipped: {avail / GiB:.1f} GiB available, it needs 18 GiB (peak ~16 GiB + margin)")
        return 0
    from lokr_trainer.testing import write_random_sdxl

    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="train_bench_", dir="/tmp"))
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "random_sdxl_fp16.safetensors"
    images, run = folder / "images", folder / "run"
    try:
        if not model.exists():
            free = shutil.disk_usage(folder).free
            if free < 9 * 10**9:
                print(f"part cpu-fullsize: skipped: {free / 1e9:.1f} GB free in {folder}, writing the model needs 7 GB")
                return 0
            t = time.perf_counter()
            write_random_sdxl(model, progress=False)
            print(f"wrote {model} ({model.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")
        shutil.rmtree(images, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
        _write_images(images, 2, args.resolution)
        cfg_path = folder / "train_bench_config.json"
        cfg_path.write_text(json.dumps(fullsize_config(model, images, run, args.steps, args.resolution, args.optimizer), indent=1))
        print(f"\npart cpu-fullsize: path used: Trainer.fit (the real product) on {model.name}; bf16 base, bf16 autocast, "
              f"gradient checkpointing, cached latents, kohaku-xl-delta on UNet + both TEs, {args.optimizer}, "
              f"{args.resolution}² (latent {args.resolution // 8}²), batch 1, {args.steps} steps; "
              f"{avail / GiB:.1f} GiB available at start, load average {os.getloadavg()[0]:.2f}")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", "_fullsize-child", "--config", str(cfg_path),
               "--threads", str(args.threads)]
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            print(p.stdout[-4000:], p.stderr[-4000:], sep="\n")
            print(f"part cpu-fullsize: the training child failed (exit {p.returncode})")
            return 1
        r = json.loads(line[len("RESULT "):])
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        steady = r["steady_s"]
        per_step = statistics.mean(steady) if steady else float("nan")
        print(f"\n{'quantity':<52} {'value':>12}")
        print(f"{'process wall (start, load, hash, cache, 2 steps, save)':<52} {wall:>10.0f} s")
        print(f"{'fit() to the first loss (load, hash, cache, forward 1)':<52} {r['first_forward_s']:>10.0f} s")
        print(f"{'first step ends after fit() start':<52} {r['first_step_s']:>10.0f} s")
        print(f"{'s/step (steps after the first)':<52} {per_step:>10.1f} s   {' '.join(f'{x:.1f}' for x in steady)}")
        print(f"{'losses':<52} {' '.join(f'{x:.4f}' for x in r['losses']):>12}")
        rss = r["peak_rss"]
        print(f"{'peak RSS (ru_maxrss of the training process)':<52} {rss / GiB:>8.2f} GiB   "
              f"({rss / 1e9:.2f} GB; target < 16 GB: {'OK' if rss < 16e9 else 'OVER'})")
        for i, x in enumerate(r["peak_rss_by_step"], 1):
            print(f"{f'  peak RSS when step {i} ended':<52} {x / GiB:>8.2f} GiB")
        if r["peak_rss_by_step"] and rss > r["peak_rss_by_step"][-1]:
            print(f"{'  (the rest: the final state + adapter save)':<52} {(rss - r['peak_rss_by_step'][-1]) / GiB:>+8.2f} GiB")
        print(f"{'  cross-check: RUSAGE_CHILDREN max':<52} {children / GiB:>8.2f} GiB")
        print("ru_maxrss counts file pages mapped into the process too; the loader reads each tensor's byte range "
              "(no mmap), so this is the process's own memory.")
        print(json.dumps({"wall_s": round(wall, 1), "s_per_step": per_step, "peak_rss_bytes": rss, **{k: r[k] for k in ("first_forward_s", "first_step_s", "losses")}}))
        return 0
    finally:
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(images, ignore_errors=True)
        (folder / "train_bench_config.json").unlink(missing_ok=True)
        if not args.keep:
            model.unlink(missing_ok=True)
            if args.dir is None:
                shutil.rmtree(folder, ignore_errors=True)


# ==================================================================================== part 3


def _gpu_models(device: torch.device) -> Any:
    from lokr_trainer.sdxl import configs
    from lokr_trainer.sdxl.load import SDXLModels, _quiet_transformers, build_text_encoder, build_text_encoder_2, build_unet
    from lokr_trainer.sdxl.tokenizers import build_tokenizers

    torch.manual_seed(0)
    with _quiet_transformers(), torch.device(device):
        unet = build_unet(configs.SDXL_UNET_CONFIG)
        te1 = build_text_encoder(configs.SDXL_TEXT_ENCODER_CONFIG)
        te2 = build_text_encoder_2(configs.SDXL_TEXT_ENCODER_2_CONFIG)
    tok1, tok2 = build_tokenizers()
    return SDXLModels(unet=unet, text_encoder=te1, text_encoder_2=te2, vae=None, tokenizer=tok1, tokenizer_2=tok2,
                      scheduler_config=dict(configs.SDXL_SCHEDULER_CONFIG))


def _gpu_one(models: Any, precision: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from lokr_trainer.lokr import attach_lokr
    from lokr_trainer.lokr.targets import LoKrConfig
    from lokr_trainer.train.diffusion import make_schedule_from_config
    from lokr_trainer.train.module import SDXLTrainingModule, freeze_unreachable_adapters
    from lokr_trainer.train.optim import build_optimizer
    from lokr_trainer.train.prompts import PromptEncoder, make_time_ids

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    for m in (models.unet, models.text_encoder, models.text_encoder_2):
        m.to(dtype)
    torch.manual_seed(0)
    network = attach_lokr(models, LoKrConfig.from_preset("kohaku-xl-delta"))
    network.to(device)
    try:
        pe = PromptEncoder(models.tokenizer, models.tokenizer_2, models.text_encoder, models.text_encoder_2)
        module = SDXLTrainingModule(models.unet, models.text_encoder, models.text_encoder_2, network, pe,
                                    make_schedule_from_config(models.scheduler_config), min_snr_gamma=5.0).to(device)
        models.unet.enable_gradient_checkpointing()
        for te in (models.text_encoder, models.text_encoder_2):
            te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            te.train()
        models.unet.train()
        freeze_unreachable_adapters(network, models.text_encoder)
        params = module.trainable_parameters()
        opt = build_optimizer(args.optimizer, network.param_groups(unet_lr=4e-5, te1_lr=1e-5, te2_lr=1e-5),
                              weight_decay=0.01, betas=(0.9, 0.999))
        scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        b, side = args.batch, args.resolution // 8
        g = torch.Generator(device=device).manual_seed(0)
        captions = [f"1girl, solo, looking at viewer, sample {i}, simple background, masterpiece" for i in range(b)]
        time_ids = make_time_ids([(args.resolution,) * 2] * b, [(0, 0)] * b, [(args.resolution,) * 2] * b, device=device)

        def step() -> float:
            batch = {
                "latents": torch.randn((b, 4, side, side), generator=g, device=device),
                "noise": torch.randn((b, 4, side, side), generator=g, device=device),
                "timesteps": torch.randint(0, 1000, (b,), generator=g, device=device),
                "time_ids": time_ids,
                "captions": captions,
            }
            with torch.autocast("cuda", dtype=dtype):
                loss = module(batch).mean()
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        losses = [step() for _ in range(args.steps)]
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        ips = b * args.steps / wall
        flop = 3 * UNET_FLOP_1024 * (args.resolution / 1024) ** 2
        return {"precision": precision, "img_s": ips, "s_step": wall / args.steps,
                "peak_vram": torch.cuda.max_memory_allocated(), "mfu": flop * ips / (args.peak_tflops * 1e12),
                "loss": losses[-1]}
    finally:
        import gc

        network.remove()
        del network
        gc.collect()
        torch.cuda.empty_cache()


def run_gpu(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("GPU part: not measured (no CUDA device)")
        return 0
    _quiet()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"\npart gpu: {torch.cuda.get_device_name(device)}; full-size SDXL (random init), {args.resolution}², "
          f"batch {args.batch}, kohaku-xl-delta on UNet + both TEs, gradient checkpointing, cached-latent style "
          f"inputs, captions through the trained TEs, {args.optimizer}; {args.warmup} warm-up + {args.steps} timed steps")
    models = _gpu_models(device)
    rows = []
    for precision in args.precisions:
        try:
            rows.append(_gpu_one(models, precision, args, device))
        except torch.cuda.OutOfMemoryError as e:
            print(f"{precision}: out of memory ({str(e).splitlines()[0]})")
            torch.cuda.empty_cache()
    flop = 3 * UNET_FLOP_1024 * (args.resolution / 1024) ** 2
    print(f"\n{'precision':<10} {'img/s':>7} {'s/step':>7} {'peak VRAM':>10} {'MFU':>6}   (MFU = {flop / 1e12:.1f} TFLOP/img "
          f"x img/s / {args.peak_tflops:g} TFLOPS; Delta's 2x3090 run: 1.25 img/s per GPU, ~36 %)")
    for r in rows:
        print(f"{r['precision']:<10} {r['img_s']:>7.2f} {r['s_step']:>7.2f} {r['peak_vram'] / GiB:>7.1f} GiB {r['mfu'] * 100:>5.1f}%"
              f"   loss {r['loss']:.4f}; fits 24 GB card: {'yes' if r['peak_vram'] <= 22 * GiB else 'NO'}")
    print(json.dumps([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]))
    return 0


# ==================================================================================== main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", default="cpu-compare", choices=["cpu-compare", "cpu-fullsize", "gpu", "_fullsize-child"])
    p.add_argument("--smoke", action="store_true", help="cpu-compare on the tiny model (seconds; for tests)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads; default 2, smoke 1)")
    p.add_argument("--repeat", type=int, default=None, help="cpu-compare: timed rounds (default 3; smoke 1)")
    p.add_argument("--latent", type=int, default=None, help="cpu-compare: latent side (default 64; smoke 16)")
    p.add_argument("--dir", default=None, help="cpu-fullsize: where the 7 GB random SDXL is written (default: temp)")
    p.add_argument("--keep", action="store_true", help="cpu-fullsize: keep the random SDXL for another run")
    p.add_argument("--steps", type=int, default=None, help="cpu-fullsize: training steps (default 2); gpu: timed steps (default 5)")
    p.add_argument("--resolution", type=int, default=None, help="image side (cpu-fullsize default 256, gpu 1024)")
    p.add_argument("--batch", type=int, default=4, help="gpu: batch size")
    p.add_argument("--warmup", type=int, default=2, help="gpu: untimed steps first")
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"], help="gpu")
    p.add_argument("--optimizer", default="lion8bit", choices=["adamw", "lion", "adamw8bit", "lion8bit"],
                   help="cpu-fullsize and gpu (default lion8bit, the Delta recipe's; AdamW's fp32 state adds 2.9 GB at full size)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="gpu: dense bf16/fp16 peak (H100/H200 989)")
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke and args.part != "cpu-compare":
        p.error("--smoke runs the cpu-compare part")
    if args.threads is None:
        args.threads = 1 if args.smoke else 2
    if args.part == "cpu-fullsize":
        args.steps = args.steps or 2
        args.resolution = args.resolution or 256
        if args.steps < 2:
            p.error("cpu-fullsize needs --steps >= 2 (the first step includes warm-up)")
    elif args.part == "gpu":
        args.steps = args.steps or 5
        args.resolution = args.resolution or 1024
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.part != "gpu":
        torch.set_num_threads(args.threads)
    try:
        if args.part == "cpu-compare":
            run_compare(args)
            return 0
        if args.part == "cpu-fullsize":
            return run_fullsize(args)
        if args.part == "_fullsize-child":
            return fullsize_child(args.config)
        return run_gpu(args)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
