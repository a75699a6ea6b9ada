"""Validation loss at fixed timesteps and fixed noise, comparable across steps and runs.

Training losses are noisy because every step draws new timesteps and noise;
here each held-out sample is evaluated at every timestep of
``[validation] timesteps`` with noise seeded by ``(validation.seed, sample,
timestep)`` and the latent mean (no VAE sampling), so the number moves only
when the adapter does.
"""

from __future__ import annotations

from typing import Any

import torch

from lokr_trainer.data import collate
from lokr_trainer.train.module import latents_from_moments, sample_generator

VALIDATION_STREAM = 0x7A1


@torch.no_grad()
def validation_loss(module: Any, dataset: Any, vae: Any, cfg: Any, scaling: float, shift: float, device: Any) -> float:
    """Mean unweighted MSE of ``module`` (an unwrapped SDXLTrainingModule) over samples × timesteps."""
    from lokr_trainer.train.encode import encode_moments

    was_training = module.training
    module.eval()
    unet_was = module.unet.training
    module.unet.eval()
    total, count = 0.0, 0
    n = min(len(dataset), cfg.max_samples)
    by_bucket: dict[int, list[int]] = {}
    for i in range(n):  # one bucket (one image size) per batch
        by_bucket.setdefault(int(dataset.index.bucket_ids[i]), []).append(i)
    chunks = [ids[k : k + cfg.batch_size] for _, ids in sorted(by_bucket.items()) for k in range(0, len(ids), cfg.batch_size)]
    try:
        for chunk in chunks:
            batch = collate([dataset[(0, i)] for i in chunk])
            if batch["size"] == 0:
                continue
            moments = encode_moments(vae, batch["pixel_values"]) if batch["pixel_values"] is not None else batch["latents"]
            latents = latents_from_moments(moments.to(device), torch.zeros_like(moments[:, : moments.shape[1] // 2]).to(device), scaling, shift)
            for t in cfg.timesteps:
                noise = torch.stack(
                    [
                        torch.randn(latents.shape[1:], generator=sample_generator(cfg.seed, int(t), int(i), VALIDATION_STREAM))
                        for i in batch["indices"]
                    ]
                ).to(device)
                inputs = {
                    "latents": latents,
                    "noise": noise,
                    "timesteps": torch.full((latents.shape[0],), int(t), dtype=torch.long, device=device),
                    "time_ids": batch["time_ids"].to(device),
                    "captions": batch["captions"],
                }
                saved = module.min_snr_gamma, module.debiased
                module.min_snr_gamma, module.debiased = None, False  # plain MSE, not the training weighting
                try:
                    losses = module(inputs)
                finally:
                    module.min_snr_gamma, module.debiased = saved
                total += float(losses.sum())
                count += losses.numel()
    finally:
        module.train(was_training)
        module.unet.train(unet_was)
    return total / max(1, count)
