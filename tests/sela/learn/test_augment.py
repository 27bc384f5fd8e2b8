"""Batched augmentations: shapes, determinism under a seed, and each operation doing what it says."""

import pytest
import torch

from sela.config import AugmentParams
from sela.learn.augment import IMAGENET_MEAN, IMAGENET_STD, augment, center, normalise, to_float


def params(**changes) -> AugmentParams:
    values = dict(crop_scale_min=1.0, crop_scale_max=1.0, grayscale_probability=0.0, color_jitter=0.0,
                  flip_probability=0.0)
    return AugmentParams(**{**values, **changes})


def images(count: int = 6, size: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (count, size, size, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def unnormalise(out: torch.Tensor) -> torch.Tensor:
    """Normalised (B, 3, H, W) -> the augmented image in [0, 1]."""
    return out * torch.tensor(IMAGENET_STD)[None, :, None, None] + torch.tensor(IMAGENET_MEAN)[None, :, None, None]


# Images per statistical test: a drawn fraction's binomial std is sqrt(p (1 - p) / COUNT), 0.009 at p = 0.2.
COUNT = 2000


def test_identity_settings_reproduce_the_centre_view():
    batch = images()
    out = augment(batch, params(), 16, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, center(batch, 16), atol=1e-4, rtol=0)


def test_flip_probability_one_mirrors():
    batch = images()
    out = augment(batch, params(flip_probability=1.0), 16, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, center(batch, 16).flip(-1), atol=1e-4, rtol=0)


def test_grayscale_probability_one_gives_equal_channels():
    out = augment(images(), params(grayscale_probability=1.0), 16, torch.Generator().manual_seed(1))
    raw = out * torch.tensor([0.229, 0.224, 0.225])[None, :, None, None] + torch.tensor([0.485, 0.456, 0.406])[
        None, :, None, None]
    torch.testing.assert_close(raw[:, 0], raw[:, 1], atol=1e-4, rtol=0)


def test_paper_augmentations_are_seeded_and_vary_per_image():
    paper = params(crop_scale_min=0.08, grayscale_probability=0.2, color_jitter=0.4, flip_probability=0.5)
    batch = images(8).repeat(2, 1, 1, 1)
    first = augment(batch, paper, 12, torch.Generator().manual_seed(3))
    second = augment(batch, paper, 12, torch.Generator().manual_seed(3))
    assert first.shape == (16, 3, 12, 12)
    torch.testing.assert_close(first, second)
    assert not torch.allclose(first[:8], first[8:])  # the same image, augmented differently


def test_grayscale_fraction_matches_its_probability():
    # Random colours: equal channels can only come from the grayscale step.
    out = unnormalise(augment(images(COUNT, 8), params(grayscale_probability=0.2), 8, torch.Generator().manual_seed(4)))
    gray = (out.amax(dim=1) - out.amin(dim=1)).amax(dim=(1, 2)) < 1e-4
    assert abs(gray.float().mean().item() - 0.2) < 0.04  # 4.5 binomial std (0.009)


def test_flip_fraction_matches_its_probability():
    # A left-to-right ramp, whose mirror runs right to left. Not 0.5: a flip drawn with 1 - p must fail too.
    ramp = torch.arange(8, dtype=torch.uint8) * 32 + 16
    batch = ramp[None, None, :, None].expand(COUNT, 8, 8, 3).contiguous()
    out = augment(batch, params(flip_probability=0.3), 8, torch.Generator().manual_seed(5))
    mirrored = out[:, 0, 0, 0] > out[:, 0, 0, -1]
    view = center(batch, 8)
    torch.testing.assert_close(out, torch.where(mirrored[:, None, None, None], view.flip(-1), view), atol=1e-4, rtol=0)
    assert abs(mirrored.float().mean().item() - 0.3) < 0.045  # 4.4 binomial std (0.0102)


def crop_extents(scale: tuple[float, float], side: int = 64, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Width and height (COUNT,) of each crop as fractions of the image, read back from coordinate ramps.

    Red is 4 x + 2 and green 4 y + 2 at pixel (x, y): bilinear resampling keeps a ramp linear, so the first and
    last output columns (rows) give the input coordinates of their pixel centres, (size - 1) / size of the crop apart.
    """
    coordinate = torch.arange(side, dtype=torch.uint8) * 4 + 2
    batch = torch.zeros(COUNT, side, side, 3, dtype=torch.uint8)
    batch[..., 0] = coordinate[None, None, :]
    batch[..., 1] = coordinate[None, :, None]
    settings = params(crop_scale_min=scale[0], crop_scale_max=scale[1])
    pixel = (unnormalise(augment(batch, settings, size, torch.Generator().manual_seed(6))) * 255 - 2) / 4
    width = (pixel[:, 0, 0, -1] - pixel[:, 0, 0, 0]) / side * size / (size - 1)
    height = (pixel[:, 1, -1, 0] - pixel[:, 1, 0, 0]) / side * size / (size - 1)
    return width, height


def test_crop_areas_and_aspect_ratios_span_their_ranges():
    width, height = crop_extents((0.2, 0.6))
    area, ratio = width * height, width / height
    # The smallest crop (0.39 of the side) keeps every sample inside the image: only float rounding is left.
    assert area.min() >= 0.2 - 1e-3 and area.max() <= 0.6 + 1e-3
    assert area.min() < 0.21 and area.max() > 0.59  # drawn over the whole range, not pinned to one end
    assert ratio.min() >= 3 / 4 - 1e-3 and ratio.max() <= 4 / 3 + 1e-3
    assert ratio.min() < 0.76 and ratio.max() > 1.32


def test_crop_scale_one_keeps_the_whole_image():
    width, height = crop_extents((1.0, 1.0))
    torch.testing.assert_close(width, torch.ones(COUNT), atol=1e-3, rtol=0)
    torch.testing.assert_close(height, torch.ones(COUNT), atol=1e-3, rtol=0)


def test_brightness_factor_lies_within_the_jitter_strength():
    # A uniform grey is its own mean and its own grey, with zero hue: contrast, saturation and hue leave it alone.
    grey = torch.full((COUNT, 8, 8, 3), 100, dtype=torch.uint8)
    out = unnormalise(augment(grey, params(color_jitter=0.4), 8, torch.Generator().manual_seed(7)))
    factor = out.mean(dim=(1, 2, 3)) / (100 / 255)
    assert factor.min() >= 0.6 - 1e-4 and factor.max() <= 1.4 + 1e-4
    assert factor.min() < 0.61 and factor.max() > 1.39  # drawn over the whole range


def test_normalise_uses_imagenet_statistics():
    grey = torch.full((1, 3, 2, 2), 0.485)
    assert abs(normalise(grey)[0, 0].mean().item()) < 1e-6
    assert to_float(torch.full((1, 2, 2, 3), 255, dtype=torch.uint8)).max() == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_augmentation_equals_cpu_for_the_same_seed():
    # The random parameters are drawn on the CPU generator either way: the same images, crops, jitter and flips.
    settings = params(crop_scale_min=0.3, grayscale_probability=0.5, color_jitter=0.4, flip_probability=0.5)
    batch = images(32, 32)
    on_cpu = augment(batch, settings, 24, torch.Generator().manual_seed(3))
    on_gpu = augment(batch.cuda(), settings, 24, torch.Generator().manual_seed(3))
    assert on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-3, rtol=1e-3)
