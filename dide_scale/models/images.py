"""Images as padded patch sequences: the layout every model of the project takes.

A batch of images of different sizes and aspect ratios is held as timm NaFlexViT holds
it: ``patches`` [B, N, P*P*3] (each patch flattened row by row, channel fastest), the
``(row, column)`` of every patch in its own image's grid, and a validity mask; N is the
same for every batch (the data geometry's patch budget), so shapes stay static on the
device.  Valid patches come first, in raster order of the image's grid; padding sits at
coordinate (0, 0) and is masked out of every attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# ViLT's normalisation (ViltImageProcessor): mean = std = 0.5.
VILT_MEAN = (0.5, 0.5, 0.5)
VILT_STD = (0.5, 0.5, 0.5)


@dataclass
class Images:
    """``patches`` [B, N, P*P*3] (uint8, or floats in [0, 1]); ``coord`` [B, N, 2] int;
    ``valid`` [B, N] bool."""

    patches: torch.Tensor
    coord: torch.Tensor
    valid: torch.Tensor

    def __len__(self) -> int:
        return self.patches.shape[0]

    def __getitem__(self, idx) -> "Images":
        return Images(self.patches[idx], self.coord[idx], self.valid[idx])

    @staticmethod
    def cat(parts: list["Images"]) -> "Images":
        return Images(torch.cat([p.patches for p in parts]), torch.cat([p.coord for p in parts]),
                      torch.cat([p.valid for p in parts]))

    def tensors(self) -> list[torch.Tensor]:
        return [self.patches, self.coord, self.valid]

    @property
    def patch_size(self) -> int:
        return int(round((self.patches.shape[-1] // 3) ** 0.5))

    def token_mask(self) -> torch.Tensor:
        """[B, 1 + N] bool: the [CLS] token, then each patch's validity."""
        return torch.cat([self.valid.new_ones(self.valid.shape[0], 1), self.valid], dim=1)

    def grid(self) -> torch.Tensor:
        """[B, 2] rows and columns of each image's patch grid."""
        return self.coord.amax(dim=1).long() + 1


def from_batch(batch: dict, suffix: str = "") -> Images | None:
    """The ``patches{suffix}`` / ``patch_coord{suffix}`` / ``patch_valid{suffix}`` of a batch dict."""
    if f"patches{suffix}" not in batch:
        return None
    return Images(batch[f"patches{suffix}"], batch[f"patch_coord{suffix}"], batch[f"patch_valid{suffix}"])


class Normalize(nn.Module):
    """Patches with pixels in [0, 1] -> the model's own normalisation (kept in the model, so a
    teacher and a student with different conventions can share one decoded batch)."""

    def __init__(self, mean=VILT_MEAN, std=VILT_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = patches.unflatten(-1, (-1, 3))  # channel fastest
        return ((x - self.mean.to(x.dtype)) / self.std.to(x.dtype)).flatten(-2)


def conv_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """A patch-embedding Conv2d weight [C, 3, P, P] -> the Linear weight [C, P*P*3] that gives
    the same result on patches flattened row by row with the channel fastest."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def sample_positions(table: torch.Tensor, coord: torch.Tensor) -> torch.Tensor:
    """Position embeddings of each patch: the table [1, C, Th, Tw] bilinearly interpolated,
    corners aligned, to each image's own grid (rows/cols from ``coord``), as ViLT's
    ``visual_embed`` does with ``F.interpolate(align_corners=True)``, but sampled at the
    patches' coordinates (``grid_sample``, as timm's NaFlexViT), so shapes stay static and
    nothing is read back to the host.  Returns [B, N, C]."""
    shape = coord.amax(dim=1) + 1  # [B, 2]
    xy = 2.0 * coord.float() / (shape[:, None, :] - 1).clamp(min=1).float() - 1.0
    grid = xy.flip(-1).unsqueeze(2)  # [B, N, 1, 2] in grid_sample's (x, y) order
    b = coord.shape[0]
    out = F.grid_sample(table.float().expand(b, -1, -1, -1), grid, mode="bilinear", align_corners=True,
                        padding_mode="border")  # [B, C, N, 1]
    return out.squeeze(-1).transpose(1, 2).to(table.dtype)


def resample_patches(images: Images, patch: int) -> Images:
    """Each patch resampled to ``patch x patch`` pixels (antialiased bilinear), the grid kept:
    a teacher with another patch size sees the same image regions as the same tokens."""
    src = images.patch_size
    if src == patch:
        return images
    b, n, _ = images.patches.shape
    x = images.patches.reshape(b * n, src, src, 3).permute(0, 3, 1, 2)
    x = F.interpolate(x.float(), size=(patch, patch), mode="bilinear", align_corners=False, antialias=True)
    x = x.clamp_(0, 1).to(images.patches.dtype).permute(0, 2, 3, 1).reshape(b, n, patch * patch * 3)
    return Images(x, images.coord, images.valid)


def unpatchify(images: Images, i: int) -> torch.Tensor:
    """Image ``i`` of the batch as [3, H, W] (its valid patches only)."""
    p = images.patch_size
    gh, gw = (int(v) for v in images.grid()[i])
    x = images.patches[i, : gh * gw].reshape(gh, gw, p, p, 3)
    return x.permute(4, 0, 2, 1, 3).reshape(3, gh * p, gw * p)


def patchify(image: torch.Tensor, patch: int) -> torch.Tensor:
    """[3, H, W] (H, W multiples of ``patch``) -> [gh * gw, patch * patch * 3]: patches in raster
    order, each flattened row by row with the channel fastest (P-P-C)."""
    _, h, w = image.shape
    gh, gw = h // patch, w // patch
    hwc = image.permute(1, 2, 0)
    return hwc.reshape(gh, patch, gw, patch, 3).permute(0, 2, 1, 3, 4).reshape(gh * gw, patch * patch * 3)


def raster_coords(gh: int, gw: int, device=None) -> torch.Tensor:
    """[gh * gw, 2] (row, col) of a grid in raster order, int32."""
    rows = torch.arange(gh, dtype=torch.int32, device=device).repeat_interleave(gw)
    return torch.stack([rows, torch.arange(gw, dtype=torch.int32, device=device).repeat(gh)], 1)


def images_from_pixels(pixels: torch.Tensor, patch: int, pixel_mask: torch.Tensor | None = None,
                       max_patches: int | None = None) -> Images:
    """A dense batch [B, 3, H, W] (ViLT's layout: each image top-left on a padded canvas,
    ``pixel_mask`` [B, H, W] marking its pixels; None = all valid) -> :class:`Images` with
    ``max_patches`` slots (default: the canvas's patch count).  Each image's valid region
    must be whole patches."""
    b, _, h, w = pixels.shape
    n_max = max_patches or (h // patch) * (w // patch)
    out = Images(pixels.new_zeros(b, n_max, patch * patch * 3),
                 torch.zeros(b, n_max, 2, dtype=torch.int32, device=pixels.device),
                 torch.zeros(b, n_max, dtype=torch.bool, device=pixels.device))
    for i in range(b):
        vh, vw = (h, w) if pixel_mask is None else (int(pixel_mask[i].any(1).sum()), int(pixel_mask[i].any(0).sum()))
        if vh % patch or vw % patch:
            raise ValueError(f"image {i}: its {vh}x{vw} valid region is not whole {patch}-px patches")
        n = (vh // patch) * (vw // patch)
        out.patches[i, :n] = patchify(pixels[i, :, :vh, :vw], patch)
        out.coord[i, :n] = raster_coords(vh // patch, vw // patch, pixels.device)
        out.valid[i, :n] = True
    return out
