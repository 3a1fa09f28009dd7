"""The encode-only Lite0 tower (BatchNorm folded, symmetric padding inside the convolutions)
computes what the trained tower computes; a ResNet model and a training model are left alone."""
import copy

import pytest
import torch
from torch import nn

from encoders.model.config import ModelConfig
from encoders.model.inference import fuse_for_encoding
from encoders.model.networks import PCME

TINY = dict(image_size=64, embed_dim=16, gru_hidden=16, attn_hidden=8,
            vocab=["<pad>", "<start>", "<end>", "<unk>", "dog"])


@pytest.fixture(scope="module")
def lite0() -> PCME:
    """Random weights and random BatchNorm statistics, so folding is not a no-op; with class
    words, so the classifier read after the folded backbone is covered too."""
    torch.manual_seed(0)
    model = PCME(ModelConfig(backbone="efficientnet-lite0", imagenet_weights=False,
                             class_words=True, **TINY))
    model.set_class_words(torch.randn_like(model.image.class_words))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval()


def test_folded_lite0_matches_the_trained_tower(lite0):
    model = lite0
    fused = copy.deepcopy(model)
    assert fuse_for_encoding(fused) == 49  # stem + head + 16 blocks (15 with an expansion)
    net = fused.image.backbone
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    # stride-1 depthwise padding moved into the convolution; stride-2 (one-sided) padding stayed
    pads = [b._depthwise_conv for b in net._blocks]
    assert all(isinstance(c.static_padding, nn.ZeroPad2d) == (c.stride[0] == 2) for c in pads)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_fmap, got_fmap = model.image.features(x), fused.image.features(x)
        (want_mu, want_lv), (got_mu, got_lv) = model.image(x), fused.image(x)
    assert torch.allclose(got_fmap, want_fmap, atol=1e-4, rtol=1e-4)
    assert torch.allclose(got_mu, want_mu, atol=1e-5)
    assert torch.allclose(got_lv, want_lv, atol=1e-4)


def test_resnet_and_training_models_are_not_folded(lite0):
    resnet = PCME(ModelConfig(**TINY)).eval()
    assert fuse_for_encoding(resnet) == 0
    assert any(isinstance(m, nn.BatchNorm2d) for m in resnet.modules())
    with pytest.raises(AssertionError, match="eval mode"):
        fuse_for_encoding(copy.deepcopy(lite0).train())
