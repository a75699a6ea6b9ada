"""A small captioned image set for the demo and the training tests (no downloads).

Each image is a smooth colour field with one shape, sized so that the tiny
SDXL's buckets (resolution 64) get more than one aspect ratio; its ``.txt``
sidecar names the colours and the shape.  The set is small enough for the
tiny UNet to memorise in a minute on a CPU, so "the loss goes down" is a
real check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 50, 190),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "stripe")
#: (width, height) cycle: square, landscape and portrait buckets at resolution 64.
SIZES = ((64, 64), (96, 64), (64, 96), (80, 80))


def _draw(w: int, h: int, fg: tuple[int, int, int], bg: tuple[int, int, int], shape: str, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    shade = 0.75 + 0.25 * (yy / max(1, h - 1))
    img = np.asarray(bg, dtype=np.float32)[None, None, :] * shade[..., None]
    cx, cy = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.35, 0.65)
    r = min(w, h) * 0.28
    if shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    elif shape == "square":
        mask = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    else:
        mask = (np.floor(xx / 8) % 2) == 0
    img[mask] = fg
    return np.clip(img, 0, 255).astype(np.uint8)


def make_tiny_dataset(out_dir: str | Path, n: int = 8, *, seed: int = 0, fmt: str = "png") -> Path:
    """Write ``n`` images with ``.txt`` captions into ``out_dir``; same seed, same files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    for i in range(n):
        fg, bg = names[i % len(names)], names[(i * 2 + 1) % len(names)]
        if fg == bg:
            bg = names[(names.index(bg) + 1) % len(names)]
        shape = SHAPES[i % len(SHAPES)]
        w, h = SIZES[i % len(SIZES)]
        arr = _draw(w, h, COLOURS[fg], COLOURS[bg], shape, rng)
        stem = out / f"img_{i:03d}"
        Image.fromarray(arr).save(stem.with_suffix(f".{fmt}"))
        stem.with_suffix(".txt").write_text(f"{fg} {shape}, {bg} background, simple_background, no_humans\n")
    return out
