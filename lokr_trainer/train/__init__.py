"""Training (``python -m lokr_trainer.train``, :class:`lokr_trainer.train.loop.Trainer`).

    prompts     long-prompt encoding (300 tokens) and SDXL time ids
    encode      VAE / text-encoder encoding and the validated latent / text caches
    diffusion   noise schedule, per-sample noise/timesteps, targets, loss weights
    optim       optimizers (Lion8bit, AdamW8bit, AdamW, Lion) and LR schedules
    batching    global batches → per-rank micro-batches (layout independence)
    module      the nn.Module DDP wraps: frozen SDXL + LoKrNetwork → per-sample loss
    checkpoint  atomic training states, resume
    identity    base-model and data digests
    loop        Trainer: the accelerate loop, saving, stopping, skipping
    report      run summary, closing line, TensorBoard
    validation  validation loss at fixed timesteps and noise
    sampling    sample images through diffusers' SDXL pipeline
"""
