"""What the benchmark tools (``tools/bench_*.py``) share: model presets from a test size to
ViLT-B/32's shapes, the photo sizes each preset sees, and synthetic images as padded patch
batches.  Public, so that a tool imports it as any module of the package (no ``sys.path``
edits, no private names)."""
from __future__ import annotations

import torch

from .models.images import images_from_pixels

PRESETS = {
    "debug": dict(width=32, depth=2, heads=2, patch_size=8, image_size=[32, 32], max_text_len=16, vocab_size=128),
    "demo": dict(width=64, depth=3, heads=4, patch_size=8, image_size=[32, 32], max_text_len=16, vocab_size=128),
    "b32": dict(width=768, depth=12, heads=12, patch_size=32, image_size=[384, 384], max_text_len=40,
                vocab_size=30522),
}
# the images each preset sees: (height, width) of the synthetic photos and data.image_shorter/longer.
# b32: 4:3 photos at ViLT's geometry, 12 x 16 = 192 real patches in 12 x 19 = 228 slots
IMAGES = {"debug": ((32, 32), (32, 32)), "demo": ((32, 32), (32, 32)), "b32": ((384, 512), (384, 639))}


def data_overrides(preset: str) -> list[str]:
    shorter, longer = IMAGES[preset][1]
    return [f"data.image_shorter={shorter}", f"data.image_longer={longer}"]


def synthetic_images(preset: str, n: int, g: torch.Generator):
    """``n`` uint8 images of the preset's photo size as a padded patch batch (ViLT geometry)."""
    (h, w), (shorter, longer) = IMAGES[preset]
    p = PRESETS[preset]["patch_size"]
    slots = (shorter // p) * (longer // p)
    return images_from_pixels(torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g), p,
                              max_patches=slots)
