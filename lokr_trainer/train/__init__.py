"""Training.

    prompts   long-prompt encoding (300 tokens) and SDXL time ids
    encode    VAE / text-encoder encoding and the validated latent / text caches
"""
