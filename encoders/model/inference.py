"""An encode-only image tower: the same function as the trained one, fewer memory passes.

On a CPU, EfficientNet-Lite0 at 128 px spends more time in memory-bound element-wise passes than
in its convolutions (profiled on 64-image batches: BatchNorm ~19%, ReLU6 ~16%, the zero padding
of its TensorFlow-style 'same' convolutions ~18%, convolutions ~40%). For encoding only:
  - each BatchNorm (eval statistics) is folded into the convolution before it;
  - symmetric 'same' padding (every stride-1 convolution) moves into the convolution itself,
    which pads without a separate fill-and-copy pass (stride-2 padding is one-sided and stays);
  - ReLU6 works in place (its inputs are never read again).
The result matches the unfused tower to float rounding (tests/test_inference_fusion.py). Only
models loaded for encoding are changed this way, never one that trains.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

logger = logging.getLogger(__name__)

# (convolution, BatchNorm after it) attribute pairs of EfficientNet-Lite0 and of its blocks
LITE0_PAIRS = (("_conv_stem", "_bn0"), ("_conv_head", "_bn1"))
BLOCK_PAIRS = (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))


def fuse_for_encoding(model) -> int:
    """Fold the image backbone's BatchNorms in place (the model must be in eval mode and is for
    encoding only afterwards); returns the number of folded pairs. A ResNet backbone is left
    as it is (its convolutions are not the bottleneck at the scenes' sizes)."""
    if model.image is None or model.image.kind != "efficientnet-lite0":
        return 0
    assert not model.training, "fold BatchNorm only into a model in eval mode"
    net = model.image.backbone
    folded = sum(_fold(net, conv, bn) for conv, bn in LITE0_PAIRS)
    for block in net._blocks:
        folded += sum(_fold(block, conv, bn) for conv, bn in BLOCK_PAIRS)
    for m in net.modules():
        if isinstance(m, nn.ReLU6):
            m.inplace = True
    net.to(memory_format=torch.channels_last)  # the folded weights keep the fast layout
    logger.debug("image backbone: %d BatchNorms folded for encoding", folded)
    return folded


def _fold(owner: nn.Module, conv_name: str, bn_name: str) -> int:
    conv, bn = getattr(owner, conv_name, None), getattr(owner, bn_name, None)
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
        return 0
    with torch.no_grad():
        fused = fuse_conv_bn_eval(conv, bn)
    _absorb_symmetric_padding(fused)
    setattr(owner, conv_name, fused)
    setattr(owner, bn_name, nn.Identity())
    return 1


def _absorb_symmetric_padding(conv: nn.Conv2d) -> None:
    pad = getattr(conv, "static_padding", None)
    if isinstance(pad, nn.ZeroPad2d):
        left, right, top, bottom = pad.padding
        if left == right and top == bottom:
            conv.padding = (top, left)
            conv.static_padding = nn.Identity()
