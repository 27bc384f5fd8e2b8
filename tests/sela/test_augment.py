"""Batched augmentations: shapes, determinism under a seed, and each operation doing what it says."""

import pytest
import torch

from sela.augment import augment, center, normalise, to_float
from sela.config import AugmentParams


def params(**changes) -> AugmentParams:
    values = dict(crop_scale_min=1.0, crop_scale_max=1.0, grayscale_probability=0.0, color_jitter=0.0,
                  flip_probability=0.0)
    return AugmentParams(**{**values, **changes})


def images(count: int = 6, size: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (count, size, size, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


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
