"""Training: long-prompt encoding and SDXL time ids (``prompts``)."""
