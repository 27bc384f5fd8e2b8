"""The paper's augmentations, applied to whole batches of tensors (CPU or GPU) instead of one PIL image at a time.

RandomResizedCrop, ColorJitter(s, s, s, min(s, 0.5)) with s = ``color_jitter``, RandomGrayscale(p) with
p = ``grayscale_probability``, horizontal flip and ImageNet normalisation, each drawn independently per image.
Batched so that a 2-core machine is not bound by per-image Python work.
"""

import functools
import math

import torch
import torch.nn.functional as functional

from sela.config import AugmentParams

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)
_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_FROM_YIQ = torch.linalg.inv(_TO_YIQ)


@functools.cache
def _constant(name: str, device: torch.device) -> torch.Tensor:
    """A fixed tensor on ``device``, made once: a fresh host-to-GPU copy every batch would stall the GPU queue."""
    values = {"mean": torch.tensor(IMAGENET_MEAN)[None, :, None, None],
              "std": torch.tensor(IMAGENET_STD)[None, :, None, None],
              "luma": torch.tensor(_LUMA)[None, :, None, None], "to_yiq": _TO_YIQ, "from_yiq": _FROM_YIQ}[name]
    return values.to(device)


class _Uniforms:
    """A batch's random numbers, drawn at once on the generator's device (the CPU) and moved in one copy.

    The same seed gives the same augmentations on any device, and a GPU gets one asynchronous transfer per batch
    instead of one blocking copy per parameter. ``take`` hands out (count,) rows in order, scaled to [low, high).
    """

    def __init__(self, rows: int, count: int, generator: torch.Generator, device: torch.device) -> None:
        values = torch.rand(rows * count, generator=generator).view(rows, count)
        if device.type == "cuda":
            values = values.pin_memory().to(device, non_blocking=True)
        self.values, self.taken = values, 0

    def take(self, low: float, high: float) -> torch.Tensor:
        row = self.values[self.taken]
        self.taken += 1
        return row * (high - low) + low


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of (B, 3, H, W) in [0, 1]."""
    return (images - _constant("mean", images.device)) / _constant("std", images.device)


def random_resized_crop(
    images: torch.Tensor, size: int, scale: tuple[float, float], uniforms: _Uniforms
) -> torch.Tensor:
    """Crop a random area fraction in ``scale`` with aspect ratio in [3/4, 4/3], resize to ``size``. (B,3,H,W)."""
    count = images.shape[0]
    area = uniforms.take(scale[0], scale[1])
    log_ratio = uniforms.take(math.log(3 / 4), math.log(4 / 3))
    # Keep the crop inside the image (torchvision resamples until it fits; clamping the ratio is the batched way).
    ratio = torch.minimum(torch.maximum(torch.exp(log_ratio), area), 1 / area)
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    # affine_grid works in [-1, 1] coordinates: the crop centre may move by (1 - extent).
    shift_x = (1 - width) * uniforms.take(-1, 1)
    shift_y = (1 - height) * uniforms.take(-1, 1)
    zero = torch.zeros_like(width)
    theta = torch.stack([width, zero, shift_x, zero, height, shift_y], dim=1).view(count, 2, 3)
    grid = functional.affine_grid(theta, [count, 3, size, size], align_corners=False)
    return functional.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    return (images * _constant("luma", images.device)).sum(dim=1, keepdim=True).expand_as(images)


def _rotate_hue(images: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Hue shift as a rotation in YIQ space (cheap and batched); ``angle`` (B,) radians."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(angle), torch.zeros_like(angle)
    rotation = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], dim=1).view(-1, 3, 3)
    transform = _constant("from_yiq", images.device) @ rotation @ _constant("to_yiq", images.device)
    return torch.einsum("bij,bjhw->bihw", transform, images)


def color_jitter(images: torch.Tensor, strength: float, uniforms: _Uniforms) -> torch.Tensor:
    """Brightness, contrast and saturation factors in [1-s, 1+s], then a hue shift in [-h, h] turns, h = min(s, 0.5).

    torchvision's ColorJitter(s, s, s, h), but in this fixed order and clamped to [0, 1] once at the end. (B,3,H,W).
    """
    if strength == 0:
        return images

    def factor() -> torch.Tensor:
        return uniforms.take(1 - strength, 1 + strength)[:, None, None, None]

    images = images * factor()
    mean = _grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean) * factor() + mean
    gray = _grayscale(images)
    images = (images - gray) * factor() + gray
    hue = min(strength, 0.5)
    images = _rotate_hue(images, uniforms.take(-hue, hue) * 2 * math.pi)
    return images.clamp(0, 1)


def augment(
    images: torch.Tensor, params: AugmentParams, size: int, generator: torch.Generator
) -> torch.Tensor:
    """uint8 (B, H, W, 3) on any device -> augmented, normalised float (B, 3, size, size) on the same device."""
    batch = to_float(images)
    # Four numbers per image for the crop, four for the jitter (when on), one each for grayscale and flip.
    uniforms = _Uniforms(4 + 4 * (params.color_jitter > 0) + 2, batch.shape[0], generator, batch.device)
    batch = random_resized_crop(batch, size, (params.crop_scale_min, params.crop_scale_max), uniforms)
    batch = color_jitter(batch, params.color_jitter, uniforms)
    gray = uniforms.take(0, 1) < params.grayscale_probability
    batch = torch.where(gray[:, None, None, None], _grayscale(batch), batch)
    flip = uniforms.take(0, 1) < params.flip_probability
    batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    return normalise(batch)


def center(images: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation view: uint8 (B, H, W, 3) -> resized, normalised float (B, 3, size, size)."""
    batch = to_float(images)
    if batch.shape[-1] != size or batch.shape[-2] != size:
        batch = functional.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False)
    return normalise(batch)
