"""The paper's augmentations, applied to whole batches of tensors (CPU or GPU) instead of one PIL image at a time.

RandomResizedCrop, ColorJitter(b, c, s, h), RandomGrayscale(0.2), horizontal flip and ImageNet normalisation,
each drawn independently per image. Batched so that a 2-core machine is not bound by per-image Python work.
"""

import math

import torch
import torch.nn.functional as functional

from sela.config import AugmentParams

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of (B, 3, H, W) in [0, 1]."""
    mean = images.new_tensor(IMAGENET_MEAN)[None, :, None, None]
    std = images.new_tensor(IMAGENET_STD)[None, :, None, None]
    return (images - mean) / std


def _uniform(count: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    # Drawn on the generator's device (CPU), then moved: the same seed gives the same augmentations on any device.
    return (torch.rand(count, generator=generator) * (high - low) + low).to(device)


def random_resized_crop(
    images: torch.Tensor, size: int, scale: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """Crop a random area fraction in ``scale`` with aspect ratio in [3/4, 4/3], resize to ``size``. (B,3,H,W)."""
    count, device = images.shape[0], images.device
    area = _uniform(count, scale[0], scale[1], generator, device)
    log_ratio = _uniform(count, math.log(3 / 4), math.log(4 / 3), generator, device)
    # Keep the crop inside the image (torchvision resamples until it fits; clamping the ratio is the batched way).
    ratio = torch.minimum(torch.maximum(torch.exp(log_ratio), area), 1 / area)
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    # affine_grid works in [-1, 1] coordinates: the crop centre may move by (1 - extent).
    shift_x = (1 - width) * _uniform(count, -1, 1, generator, device)
    shift_y = (1 - height) * _uniform(count, -1, 1, generator, device)
    theta = torch.zeros(count, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 1, 1] = width, height
    theta[:, 0, 2], theta[:, 1, 2] = shift_x, shift_y
    grid = functional.affine_grid(theta, [count, 3, size, size], align_corners=False)
    return functional.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    luma = images.new_tensor(_LUMA)[None, :, None, None]
    return (images * luma).sum(dim=1, keepdim=True).expand_as(images)


def _rotate_hue(images: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Hue shift as a rotation in YIQ space (cheap and batched); ``angle`` (B,) radians."""
    to_yiq = images.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    from_yiq = torch.linalg.inv(to_yiq)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(images.shape[0], 3, 3, device=images.device)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = cos, -sin, sin, cos
    transform = from_yiq @ rotation @ to_yiq
    return torch.einsum("bij,bjhw->bihw", transform, images)


def color_jitter(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation in [1-s, 1+s] and hue in [-s/2, s/2] turns... capped at 0.5 (B,3,H,W)."""
    if strength == 0:
        return images
    count, device = images.shape[0], images.device

    def factor() -> torch.Tensor:
        return _uniform(count, 1 - strength, 1 + strength, generator, device)[:, None, None, None]

    images = images * factor()
    mean = _grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean) * factor() + mean
    gray = _grayscale(images)
    images = (images - gray) * factor() + gray
    hue = min(strength, 0.5)
    images = _rotate_hue(images, _uniform(count, -hue, hue, generator, device) * 2 * math.pi)
    return images.clamp(0, 1)


def augment(
    images: torch.Tensor, params: AugmentParams, size: int, generator: torch.Generator
) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> augmented, normalised float (B, 3, size, size)."""
    batch = to_float(images)
    batch = random_resized_crop(batch, size, (params.crop_scale_min, params.crop_scale_max), generator)
    batch = color_jitter(batch, params.color_jitter, generator)
    count, device = batch.shape[0], batch.device
    gray = _uniform(count, 0, 1, generator, device) < params.grayscale_probability
    batch = torch.where(gray[:, None, None, None], _grayscale(batch), batch)
    flip = _uniform(count, 0, 1, generator, device) < params.flip_probability
    batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    return normalise(batch)


def center(images: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation view: uint8 (B, H, W, 3) -> resized, normalised float (B, 3, size, size)."""
    batch = to_float(images)
    if batch.shape[-1] != size or batch.shape[-2] != size:
        batch = functional.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False)
    return normalise(batch)
