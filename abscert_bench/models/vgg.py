"""VGG-11 (CIFAR layout, no torchvision): eight 3×3 convolutions with five max-pools, then one linear classifier.

Plain nn.Sequential (Conv2d, ReLU, MaxPool2d, Flatten, Linear) that auto_LiRPA 0.3 wraps. No BatchNorm (see
resnet.py). A max-pool is skipped once the feature map is 1×1, so small inputs (8×8 digits) work too; on 32×32
inputs this is the usual CIFAR VGG-11 (512 features into the classifier). Note: auto_LiRPA 0.3's CROWN backward
through MaxPool calls `.view` on a possibly non-contiguous bound matrix and fails on this network unless that
matrix is made contiguous first (IBP is unaffected).
"""
from __future__ import annotations

from torch import nn

from .registry import MODELS, activation

VGG11: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


@MODELS.register("vgg11")
def vgg11(channels: int, height: int, width: int, num_classes: int, act: str = "relu") -> nn.Module:
    """VGG-11: conv64-M-conv128-M-conv256×2-M-conv512×2-M-conv512×2-M, flatten, linear classifier."""
    layers: list[nn.Module] = []
    for item in VGG11:
        if item == "M":
            if height >= 2 and width >= 2:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            continue
        layers += [nn.Conv2d(channels, int(item), 3, padding=1), activation(act)]
        channels = int(item)
    layers += [nn.Flatten(), nn.Linear(channels * height * width, num_classes)]
    return nn.Sequential(*layers)
