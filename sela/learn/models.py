"""Backbones with one linear head per labelling (``head_sizes``: clusters of each head)."""

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock


class SubsampledPointwise(nn.Conv2d):
    """A 1x1 convolution of stride ``step``, computed as a stride-1 one on every ``step``-th pixel (the same maths).

    oneDNN's own strided 1x1 kernel, which PyTorch runs on x86 CPUs for channels-last tensors, writes past its
    workspace in the weight gradient when there are fewer input channels than its register block (16 with AVX-512,
    8 with AVX2) and aborts the process (heap corruption) for most batch sizes: oneDNN issue #6035, met here by the
    transfer stage's ``small_resnet`` of width 8 on a batch of 43. The state_dict is a plain Conv2d's.
    """

    def __init__(self, inputs: int, outputs: int, step: int) -> None:
        super().__init__(inputs, outputs, 1, bias=False)
        self.step = step

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images[:, :, :: self.step, :: self.step])


def _conv_block(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(True))


class SmallCNN(nn.Module):
    """Four conv blocks and global pooling for small images (16-64 px). Feature size 4 * width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(3, width),
            nn.MaxPool2d(2),
            _conv_block(width, 2 * width),
            nn.MaxPool2d(2),
            _conv_block(2 * width, 4 * width),
            _conv_block(4 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature_size = 4 * width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


class CifarResNet18(nn.Module):
    """torchvision's ResNet-18 with the CIFAR stem: 3x3 stride-1 first conv, no max-pool. Feature size 512."""

    def __init__(self) -> None:
        super().__init__()
        network = resnet18(weights=None)
        network.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        network.maxpool = nn.Identity()
        network.fc = nn.Identity()
        self.network = network
        self.feature_size = 512

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)


class SmallResNet(nn.Module):
    """Residual counterpart of SmallCNN at similar cost: a 3x3 stem and three basic blocks (strides 1, 2, 2).

    Feature size 4 * width. Used to check that labels transfer to another architecture.
    """

    def __init__(self, width: int) -> None:
        super().__init__()

        def block(inputs: int, outputs: int, stride: int) -> BasicBlock:
            shortcut = None if stride == 1 and inputs == outputs else nn.Sequential(
                SubsampledPointwise(inputs, outputs, stride), nn.BatchNorm2d(outputs))
            return BasicBlock(inputs, outputs, stride=stride, downsample=shortcut)

        self.features = nn.Sequential(
            _conv_block(3, width),
            block(width, width, 1),
            block(width, 2 * width, 2),
            block(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature_size = 4 * width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


class MultiHeadNet(nn.Module):
    """Backbone, hidden layers shared by the heads, heads. forward: (B, 3, H, W) -> one logits tensor
    (B, head_sizes[h]) per head h.

    ``hidden_sizes``: widths of Linear + BatchNorm + ReLU layers between the backbone's features and the heads (the
    paper's AlexNet has two fully connected layers there); none: heads on the features. The features (kNN, probe)
    are the backbone's, before these layers, which absorb what is specific to the clustering objective.
    """

    def __init__(self, backbone: nn.Module, feature_size: int, head_sizes: Sequence[int],
                 hidden_sizes: Sequence[int] = ()) -> None:
        super().__init__()
        self.backbone = backbone
        layers: list[nn.Module] = []
        for size in hidden_sizes:
            layers += [nn.Linear(feature_size, size, bias=False), nn.BatchNorm1d(size), nn.ReLU(True)]
            feature_size = size
        self.hidden = nn.Sequential(*layers)  # empty: the identity, and no entries in the state dict
        self.heads = nn.ModuleList(nn.Linear(feature_size, size) for size in head_sizes)
        self.head_sizes = list(head_sizes)

    def joint_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, sum of head_sizes): every head's logits side by side, in head order.

        One matrix product for all heads: on a 2-core CPU, ten small products (and their backward passes) cost
        a twentieth of an SGD step of the CIFAR recipe.
        """
        shared = self.hidden(self.backbone(images))
        weight = torch.cat([head.weight for head in self.heads])
        bias = torch.cat([head.bias for head in self.heads])
        return nn.functional.linear(shared, weight, bias)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.joint_logits(images).split(self.head_sizes, dim=1))


def build_model(architecture: str, width: int, head_sizes: Sequence[int],
                hidden_sizes: Sequence[int] = ()) -> MultiHeadNet:
    """Randomly initialised network for ``architecture`` in {'small_cnn', 'small_resnet', 'resnet18'}."""
    if architecture == "small_cnn":
        backbone: nn.Module = SmallCNN(width)
    elif architecture == "small_resnet":
        backbone = SmallResNet(width)
    elif architecture == "resnet18":
        backbone = CifarResNet18()
    else:
        raise ValueError(f"unknown architecture {architecture!r}: expected 'small_cnn', 'small_resnet' or 'resnet18'")
    return MultiHeadNet(backbone, backbone.feature_size, head_sizes, hidden_sizes)


def to_device(model: MultiHeadNet, device: torch.device) -> MultiHeadNet:
    """``model`` on ``device`` in channels-last layout: what the convolution kernels are fastest in on a GPU
    (cuDNN) and on the CPU too (oneDNN; an SGD step of small_cnn at 16 px measured 1.7x faster on 2 cores)."""
    return model.to(device).to(memory_format=torch.channels_last)


def model_layout(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in the layout ``to_device`` gives the model."""
    return images.contiguous(memory_format=torch.channels_last)
