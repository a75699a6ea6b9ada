"""Sample images during training through diffusers' SDXL pipeline, with the adapters active.

The prompts are encoded by the training :class:`PromptEncoder` (the same
300-token windows, layout and TE2 ids the adapters are trained with) and
handed to the pipeline as embeddings, so a preview shows what training sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


@torch.no_grad()
def sample_images(models: Any, prompt_encoder: Any, cfg: Any, out_dir: Path, device: Any) -> list[Path]:
    """Render ``cfg.prompts`` (one image each) into ``out_dir/NN.png``; returns the paths."""
    from lokr_trainer.sdxl.load import _quiet_transformers

    if not cfg.prompts:
        return []
    modules = [models.unet, models.text_encoder, models.text_encoder_2, models.vae]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with _quiet_transformers():  # torchvision-less image-processor notes, unused scheduler keys
            from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

            scheduler = EulerDiscreteScheduler.from_config(models.scheduler_config)
        pipe = StableDiffusionXLPipeline(
            vae=models.vae,
            text_encoder=models.text_encoder,
            text_encoder_2=models.text_encoder_2,
            tokenizer=models.tokenizer,
            tokenizer_2=models.tokenizer_2,
            unet=models.unet,
            scheduler=scheduler,
        )
        pipe.set_progress_bar_config(disable=True)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        dtype = next(models.unet.parameters()).dtype
        for i, prompt in enumerate(cfg.prompts):
            pos = prompt_encoder([prompt])
            neg = prompt_encoder([cfg.negative_prompt])
            generator = torch.Generator("cpu").manual_seed(int(cfg.seed) + i)
            image = pipe(
                prompt_embeds=pos.hidden.to(device, dtype),
                pooled_prompt_embeds=pos.pooled.to(device, dtype),
                negative_prompt_embeds=neg.hidden.to(device, dtype),
                negative_pooled_prompt_embeds=neg.pooled.to(device, dtype),
                num_inference_steps=cfg.steps,
                guidance_scale=cfg.cfg,
                width=cfg.width,
                height=cfg.height,
                generator=generator,
            ).images[0]
            path = out_dir / f"{i:02d}.png"
            tmp = path.with_name(f".{path.name}.tmp")
            image.save(tmp, format="PNG")
            tmp.replace(path)
            paths.append(path)
        return paths
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
