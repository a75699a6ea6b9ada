"""The module accelerate/DDP wraps: frozen SDXL + the LoKrNetwork, ``forward(batch) -> per-sample loss``.

LoKr parameters are not submodules of the UNet (lycoris keeps the base layer
outside the adapter), so ``prepare(unet)`` raises and ``prepare(network)``
silently synchronises nothing (research/training.md).  This module registers
the network (its parameters are the only trainable ones) and the frozen UNet
and text encoders, and runs the whole loss inside ``forward``, so DDP sees
every adapter gradient.  The VAE is not registered: latents are prepared
outside (cached or encoded under ``no_grad``), and DDP need not broadcast it.

Per-sample randomness (timestep, noise, input-perturbation noise, the latent
draw from cached VAE moments) comes from a generator seeded by ``(seed,
epoch, sample index)`` in :func:`draw_sample`, never from a process RNG, so a
sample gets the same draws on any rank, in any micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from lokr_trainer.train import diffusion as dfn

#: Salt of the per-sample diffusion draws (separate from caption and crop streams).
DIFFUSION_STREAM = 0xD1F


@dataclass(frozen=True)
class DrawSettings:
    """What the per-sample draws need from ``[diffusion]``."""

    min_timestep: int = 0
    max_timestep: int = 1000
    noise_offset: float = 0.0
    multires_iterations: int = 0
    multires_discount: float = 0.3
    ip_noise_gamma: float = 0.0

    @classmethod
    def from_config(cls, d: Any) -> "DrawSettings":
        return cls(
            d.min_timestep,
            d.max_timestep,
            d.noise_offset,
            d.multires_noise_iterations,
            d.multires_noise_discount,
            d.ip_noise_gamma,
        )


def sample_generator(seed: int, epoch: int, index: int, stream: int = DIFFUSION_STREAM) -> torch.Generator:
    """A CPU generator for one sample of one epoch (64-bit seed from numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(index), int(stream)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def draw_sample(
    seed: int, epoch: int, index: int, latent_chw: Sequence[int], s: DrawSettings
) -> dict[str, torch.Tensor | int]:
    """One sample's draws, in this fixed order: timestep, noise, IP noise, latent ε.

    The latent ε turns cached VAE moments into a latent sample
    (``mean + std·ε``), fresh every epoch.
    """
    g = sample_generator(seed, epoch, index)
    t = dfn.sample_timestep(g, s.min_timestep, s.max_timestep)
    noise = dfn.sample_noise(
        tuple(latent_chw),
        g,
        noise_offset=s.noise_offset,
        multires_iterations=s.multires_iterations,
        multires_discount=s.multires_discount,
    )
    ip = dfn.sample_ip_noise(tuple(latent_chw), g) if s.ip_noise_gamma > 0 else None
    eps = torch.randn(tuple(latent_chw), generator=g, dtype=torch.float32)
    out: dict[str, torch.Tensor | int] = {"timestep": t, "noise": noise, "latent_eps": eps}
    if ip is not None:
        out["ip_noise"] = ip
    return out


def latents_from_moments(moments: torch.Tensor, eps: torch.Tensor, scaling: float, shift: float = 0.0) -> torch.Tensor:
    """``(mean + std·ε − shift) · scaling`` in fp32, like ``latent_dist.sample()`` with our ε."""
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return (mean + std * eps.to(mean.device) - shift) * scaling


def freeze_unreachable_adapters(network: Any, text_encoder: nn.Module) -> list[str]:
    """Freeze adapters that can never get a gradient; returns their names.

    SDXL conditions on TE1's *penultimate* hidden state, so TE1's last
    encoder layer does not touch the loss: its adapters would stay at ΔW = 0,
    and under DDP their missing gradients stop the run ("Expected to have
    finished reduction…").  They stay in the file (ΔW = 0), untrained.
    """
    last = int(text_encoder.config.num_hidden_layers) - 1
    prefix = f"text_model.encoder.layers.{last}."
    names = [n for n in network.names("te1") if network.entries[n].path.startswith(prefix)]
    for n in names:
        network.lokr[n].requires_grad_(False)
    return names


class SDXLTrainingModule(nn.Module):
    """Frozen UNet + text encoders + trainable LoKr network; ``forward(batch)`` returns (B,) losses.

    ``batch`` keys: ``latents`` (B, C, h, w) scaled, fp32; ``noise``; optional
    ``ip_noise``; ``timesteps`` (B,) long; ``time_ids`` (B, 6); and either
    ``captions`` (list of str, encoded here, with gradients when the TE
    adapters train) or ``hidden``/``pooled`` (cached text-encoder outputs).
    Returns the per-sample weighted loss in fp32 (min-SNR / debiased weights
    applied; the caller applies sample weights and the step's mean).
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module,
        text_encoder_2: nn.Module,
        network: nn.Module,
        prompt_encoder: Any,
        schedule: dfn.NoiseSchedule,
        *,
        prediction: str = "epsilon",
        min_snr_gamma: float = 0.0,
        debiased: bool = False,
        ip_noise_gamma: float = 0.0,
        train_text_encoders: bool = True,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.network = network
        self.prompt_encoder = prompt_encoder
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod.float().clone(), persistent=False)
        self.register_buffer("snr_alphas_cumprod", schedule.snr_alphas_cumprod.float().clone(), persistent=False)
        self.prediction = prediction
        self.min_snr_gamma = min_snr_gamma or None
        self.debiased = debiased
        self.ip_noise_gamma = ip_noise_gamma
        self.train_text_encoders = train_text_encoders

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]

    def _text(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if "hidden" in batch:
            return batch["hidden"], batch["pooled"]
        if self.train_text_encoders:
            out = self.prompt_encoder(batch["captions"])
        else:
            with torch.no_grad():
                out = self.prompt_encoder(batch["captions"])
        return out.hidden, out.pooled

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        latents = batch["latents"]
        if latents.shape[0] == 0:
            # every image of this micro-batch was skipped: a zero loss that still touches every
            # adapter parameter, so DDP's gradient all-reduce runs on every rank
            return sum(p.sum() for p in self.trainable_parameters()).reshape(1) * 0.0
        unet_dtype = next(self.unet.parameters()).dtype
        device = latents.device
        t = batch["timesteps"].to(device)
        noise = batch["noise"].to(device, torch.float32)
        x0 = latents.float()
        noisy = dfn.noisy_input(
            x0,
            noise,
            t,
            self.alphas_cumprod,
            ip_noise=batch.get("ip_noise"),
            ip_noise_gamma=self.ip_noise_gamma,
        )
        target = dfn.prediction_target(x0, noise, t, self.alphas_cumprod, self.prediction)
        hidden, pooled = self._text(batch)
        pred = self.unet(
            noisy.to(unet_dtype),
            t,
            encoder_hidden_states=hidden.to(device, unet_dtype),
            added_cond_kwargs={
                "text_embeds": pooled.to(device, unet_dtype),
                "time_ids": batch["time_ids"].to(device, unet_dtype),
            },
        ).sample
        loss = dfn.per_sample_mse(pred.float(), target)
        w = dfn.loss_weights(
            t,
            self.snr_alphas_cumprod,
            prediction=self.prediction,
            min_snr_gamma=self.min_snr_gamma,
            debiased=self.debiased,
        )
        return loss * w.to(loss.device)
