"""Diffusion maths for training: noise schedule, per-sample noise draws, noisy inputs, targets, loss weights.

Everything here is a pure function of its arguments (no config objects, no model code),
so the trainer, the tests and any tool can use it alike.

Two rules shape the API:

* **Per-sample randomness.**  Every random draw takes an explicit CPU ``torch.Generator``
  (seeded by the caller from ``(seed, epoch, index)``) and draws *one sample's* values in a
  fixed, documented order; nothing touches the global RNG.  A sample's noise and timestep
  therefore do not depend on its batch mates, on how the global batch is split over
  processes or micro-batches, or on the device (CPU draws, then moved).
* **fp32 maths.**  Noising, targets, losses and weights are computed in float32 whatever
  the model dtype; the caller casts the model input afterwards.

Formulas follow ``shared/research/sd-scripts.md`` §1 (kohya-ss/sd-scripts); deliberate
differences are stated in the docstrings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lokr_trainer.errors import ConfigError

__all__ = [
    "PREDICTION_TYPES",
    "NoiseSchedule",
    "add_noise",
    "loss_weights",
    "make_schedule",
    "make_schedule_from_config",
    "noisy_input",
    "per_sample_mse",
    "prediction_target",
    "sample_ip_noise",
    "sample_noise",
    "sample_timestep",
    "snr",
]

#: Prediction types understood here (diffusers' ``prediction_type`` names).
PREDICTION_TYPES = ("epsilon", "v_prediction")

#: kohya caps the SNR at this value in the debiased weighting (avoids huge weights at t≈0).
DEBIASED_SNR_CAP = 1000.0

BETA_SCHEDULES = ("scaled_linear", "linear")


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTION_TYPES:
        raise ConfigError(
            f"unknown prediction type {prediction!r}: choose one of {', '.join(PREDICTION_TYPES)}"
        )


# -- noise schedule ----------------------------------------------------------------------------


@dataclass
class NoiseSchedule:
    """A DDPM training schedule.

    ``alphas_cumprod`` (ᾱ_t, float32, length T) is what noising and v-targets use.
    ``snr_alphas_cumprod`` is what SNR-based loss weights use: with zero-terminal-SNR it
    is the *original* (un-rescaled) schedule, as in kohya, so min-SNR and debiased weights
    never divide 0 by 0 at t = T−1; without it, it is the very same tensor object.
    """

    betas: Tensor
    alphas_cumprod: Tensor
    snr_alphas_cumprod: Tensor

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])


def _rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023 (arXiv 2305.08891) algorithm 1, in the dtype of ``betas``.

    Shift √ᾱ so that its last value is 0, scale it so that its first value is unchanged,
    and convert back to betas (the last beta becomes exactly 1).
    """
    sqrt_ac = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas


def _schedule_from_betas64(betas64: Tensor, zero_terminal_snr: bool) -> NoiseSchedule:
    original_ac = torch.cumprod(1.0 - betas64, dim=0).to(torch.float32)
    if not zero_terminal_snr:
        return NoiseSchedule(betas64.to(torch.float32), original_ac, original_ac)
    betas64 = _rescale_zero_terminal_snr(betas64)
    ac = torch.cumprod(1.0 - betas64, dim=0).to(torch.float32)
    return NoiseSchedule(betas64.to(torch.float32), ac, original_ac)


def make_schedule(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
    zero_terminal_snr: bool = False,
) -> NoiseSchedule:
    """The training noise schedule (SDXL defaults).

    ``scaled_linear``: β = linspace(√β0, √β1, T)²; ``linear``: β = linspace(β0, β1, T).
    The maths is done in float64 and rounded to float32 at the end, as the reference
    SDXL code (sgm) does; diffusers' ``DDPMScheduler`` accumulates the cumprod in float32
    and differs from this by < 1e-6 absolute.  ``zero_terminal_snr`` rescales the betas
    (Lin et al. 2023) and keeps the original ᾱ in ``snr_alphas_cumprod``.
    """
    if int(num_train_timesteps) < 2:
        raise ConfigError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
    if not 0.0 < beta_start < 1.0 or not 0.0 < beta_end < 1.0:
        raise ConfigError(f"beta_start and beta_end must lie in (0, 1), got {beta_start}, {beta_end}")
    n = int(num_train_timesteps)
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    else:
        raise ConfigError(
            f"unsupported beta_schedule {beta_schedule!r}: choose one of {', '.join(BETA_SCHEDULES)}"
        )
    return _schedule_from_betas64(betas, bool(zero_terminal_snr))


def make_schedule_from_config(
    scheduler_config: Mapping[str, Any], *, zero_terminal_snr: bool = False
) -> NoiseSchedule:
    """The schedule described by a diffusers scheduler config dict (``scheduler_config.json``).

    Reads ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule`` (diffusers'
    ``DDPMScheduler`` defaults where a key is absent) and honours a non-null
    ``trained_betas``.  Zero-terminal-SNR is on if asked here or if the config sets
    ``rescale_betas_zero_snr``.
    """
    cfg = dict(scheduler_config)
    ztsnr = bool(zero_terminal_snr or cfg.get("rescale_betas_zero_snr", False))
    trained = cfg.get("trained_betas")
    if trained is not None:
        betas = torch.as_tensor(trained, dtype=torch.float64).flatten()
        if betas.numel() < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ConfigError("scheduler config trained_betas must be at least 2 values in (0, 1)")
        return _schedule_from_betas64(betas, ztsnr)
    try:
        return make_schedule(
            num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
            beta_start=float(cfg.get("beta_start", 0.0001)),
            beta_end=float(cfg.get("beta_end", 0.02)),
            beta_schedule=str(cfg.get("beta_schedule", "linear")),
            zero_terminal_snr=ztsnr,
        )
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"bad scheduler config value: {exc}") from exc


# -- SNR and loss weights -----------------------------------------------------------------------


def _gather(values: Tensor, timesteps: Tensor, device: torch.device) -> Tensor:
    t = torch.as_tensor(timesteps, device=device).long().flatten()
    return values.to(device=device, dtype=torch.float32)[t]


def snr(timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """SNR_t = ᾱ_t / (1 − ᾱ_t) at each timestep, float32, on ``timesteps``' device."""
    t = torch.as_tensor(timesteps)
    a = _gather(alphas_cumprod, t, t.device)
    return a / (1.0 - a)


def loss_weights(
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    *,
    prediction: str = "epsilon",
    min_snr_gamma: float | None = None,
    debiased: bool = False,
) -> Tensor:
    """Per-sample float32 loss weights w(t) (kohya's ``apply_snr_weight`` / ``apply_debiased_estimation``).

    * min-SNR γ (None or 0 = off): ε-pred ``min(SNR, γ)/SNR``, v-pred ``min(SNR, γ)/(SNR+1)``.
      The ε form is evaluated as ``γ / max(SNR, γ)`` (same value, but 1 instead of 0/0 at SNR 0).
    * debiased: ε-pred ``× 1/√min(SNR, 1000)``, v-pred ``× 1/(min(SNR, 1000)+1)``.
    * both: the product; neither: ones.

    Pass ``NoiseSchedule.snr_alphas_cumprod``: with zero-terminal-SNR the rescaled schedule
    has SNR 0 at t = T−1, where the ε debiased weight is infinite.
    """
    _check_prediction(prediction)
    gamma = 0.0 if min_snr_gamma is None else float(min_snr_gamma)
    if gamma < 0 or not math.isfinite(gamma):
        raise ConfigError(f"min_snr_gamma must be a positive number, 0 or None (off), got {min_snr_gamma}")
    s = snr(timesteps, alphas_cumprod)
    w = torch.ones_like(s)
    if gamma > 0:
        if prediction == "epsilon":
            w = w * (gamma / torch.clamp(s, min=gamma))
        else:
            w = w * (torch.clamp(s, max=gamma) / (s + 1.0))
    if debiased:
        capped = torch.clamp(s, max=DEBIASED_SNR_CAP)
        if prediction == "epsilon":
            w = w / capped.sqrt()
        else:
            w = w / (capped + 1.0)
    return w


# -- per-sample random draws -------------------------------------------------------------------


def _check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"expected a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError("per-sample draws need a CPU torch.Generator (device-independent values)")


def _chw(shape_chw: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(v) for v in shape_chw)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"expected a (C, H, W) shape of positive sizes, got {tuple(shape_chw)}")
    return shape  # type: ignore[return-value]


def sample_timestep(generator: torch.Generator, min_t: int, max_t: int) -> int:
    """One uniform integer timestep in [min_t, max_t) (max exclusive, as kohya's ``randint``).

    Draw order: one ``torch.randint`` value.
    """
    _check_generator(generator)
    lo, hi = int(min_t), int(max_t)
    if lo < 0 or hi <= lo:
        raise ConfigError(f"timestep range [{min_t}, {max_t}) is empty or negative: need 0 <= min_t < max_t")
    return int(torch.randint(lo, hi, (1,), generator=generator).item())


def sample_noise(
    shape_chw: Sequence[int],
    generator: torch.Generator,
    *,
    noise_offset: float = 0.0,
    multires_iterations: int = 0,
    multires_discount: float = 0.3,
) -> Tensor:
    """One sample's training noise ε, (C, H, W) float32 on the CPU.

    Draw order (a draw happens only if its option is on):

    1. ``randn(C, H, W)`` — the base noise;
    2. noise offset: ``randn(C, 1, 1)``, added × ``noise_offset`` (broadcast over H, W);
    3. multires (pyramid) noise, for i = 1 … ``multires_iterations``: ``rand()`` → r in [2, 4),
       size (max(1, ⌊H/rⁱ⌋), max(1, ⌊W/rⁱ⌋)), ``randn(C, h, w)`` bilinearly upsampled to
       (H, W) and added × discountⁱ; stop after the first level with a side of 1;
       then the whole sum (offset included) is divided by its std.

    Deliberate differences from kohya's ``pyramid_noise_like``: kohya's loop starts at
    i = 0, which adds a second full-resolution white noise of weight 1 and leaves N−1
    coarse levels — here ``multires_iterations`` counts coarse levels only; r comes from
    the generator, not Python's global ``random``, and is per sample; the std is the
    sample's own, not the batch tensor's (so the result does not depend on batch mates).
    """
    _check_generator(generator)
    c, h, w = _chw(shape_chw)
    iterations = int(multires_iterations)
    if iterations < 0:
        raise ConfigError(f"multires_iterations must be >= 0, got {multires_iterations}")
    noise = torch.randn((c, h, w), generator=generator, dtype=torch.float32)
    if noise_offset:
        noise = noise + float(noise_offset) * torch.randn((c, 1, 1), generator=generator, dtype=torch.float32)
    if iterations > 0:
        discount = float(multires_discount)
        for i in range(1, iterations + 1):
            r = 2.0 + 2.0 * float(torch.rand((), generator=generator, dtype=torch.float64))
            hi, wi = max(1, int(h / r**i)), max(1, int(w / r**i))
            level = torch.randn((1, c, hi, wi), generator=generator, dtype=torch.float32)
            level = F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False)[0]
            noise = noise + level * (discount**i)
            if hi == 1 or wi == 1:
                break
        if noise.numel() > 1:
            noise = noise / noise.std()
    return noise


def sample_ip_noise(shape_chw: Sequence[int], generator: torch.Generator) -> Tensor:
    """One sample's input-perturbation noise ξ, (C, H, W) float32 on the CPU.

    Draw order: one ``randn(C, H, W)``.  Use a generator (or a point in its stream) of
    its own, after ``sample_noise``'s draws, so turning IP noise on leaves ε unchanged.
    """
    _check_generator(generator)
    return torch.randn(_chw(shape_chw), generator=generator, dtype=torch.float32)


# -- batched maths -----------------------------------------------------------------------------


def _coefficients(x0: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    """√ᾱ_t and √(1−ᾱ_t) as float32 of shape (B, 1, 1, …) on x0's device."""
    a = _gather(alphas_cumprod, timesteps, x0.device)
    if a.shape[0] != x0.shape[0]:
        raise ValueError(f"{a.shape[0]} timesteps for a batch of {x0.shape[0]}")
    view = (-1,) + (1,) * (x0.dim() - 1)
    return (a**0.5).view(view), ((1.0 - a) ** 0.5).view(view)


def add_noise(x0: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward diffusion √ᾱ_t·x0 + √(1−ᾱ_t)·ε, in float32 (returns float32)."""
    sa, sb = _coefficients(x0, timesteps, alphas_cumprod)
    return sa * x0.float() + sb * noise.to(device=x0.device, dtype=torch.float32)


def prediction_target(
    x0: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, prediction: str
) -> Tensor:
    """The regression target in float32: ε, or v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 (diffusers' ``get_velocity``).

    Always from the unperturbed ε, also when the input has IP noise.
    """
    _check_prediction(prediction)
    eps = noise.to(device=x0.device, dtype=torch.float32)
    if prediction == "epsilon":
        return eps
    sa, sb = _coefficients(x0, timesteps, alphas_cumprod)
    return sa * eps - sb * x0.float()


def noisy_input(
    x0: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    *,
    ip_noise: Tensor | None = None,
    ip_noise_gamma: float = 0.0,
) -> Tensor:
    """The model input: ``add_noise(x0, ε + γ·ξ, t)`` with input perturbation (arXiv 2301.11706).

    Only the input is perturbed: compute the target from the unperturbed ε with
    :func:`prediction_target`.  γ = 0 is plain ``add_noise``.
    """
    gamma = float(ip_noise_gamma)
    if gamma == 0.0:
        return add_noise(x0, noise, timesteps, alphas_cumprod)
    if ip_noise is None:
        raise ValueError("ip_noise_gamma is set but no ip_noise was given")
    eps = noise.to(device=x0.device, dtype=torch.float32)
    xi = ip_noise.to(device=x0.device, dtype=torch.float32)
    return add_noise(x0, eps + gamma * xi, timesteps, alphas_cumprod)


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample, (B,) float32: mean over every non-batch dimension."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    diff = pred.float() - target.to(device=pred.device, dtype=torch.float32)
    return diff.square().reshape(diff.shape[0], -1).mean(dim=1)
