"""Images for tests: seeded random RGB noise of a given size."""

from __future__ import annotations

import torch
from PIL import Image


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A ``width`` x ``height`` RGB image of seeded uniform noise."""
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray(
        torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8).numpy()
    )
