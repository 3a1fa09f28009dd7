import pytest
import torch
from torchvision.models.resnet import BasicBlock, ResNet

from encoders.model.checkpoint import load_model, save_checkpoint
from encoders.model.config import ModelConfig
from encoders.model.encode import pad_tokens
from encoders.model.networks import PCME, build_resnet
from encoders.model.text import SPECIALS
from core.errors import PcmeError

VOCAB = SPECIALS + ["a", "dog", "in", "park", "red", "car"]


def tiny_cfg(**kw):
    return ModelConfig(embed_dim=16, resnet_width=8, gru_hidden=12, attn_hidden=8, vocab=VOCAB, **kw)


def test_heads_shapes_unit_mu_and_free_log_var():
    torch.manual_seed(0)
    m = PCME(tiny_cfg()).eval()
    images = torch.rand(3, 3, 64, 64)
    tokens, lengths = pad_tokens([[1, 4, 5, 2], [1, 4, 2], [1, 6, 7, 8, 2]])
    mu, lv = m.image(images)
    tmu, tlv = m.text(tokens, lengths)
    assert mu.shape == lv.shape == (3, 16) and tmu.shape == tlv.shape == (3, 16)
    torch.testing.assert_close(mu.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(tmu.norm(dim=-1), torch.ones(3))
    # log_var follows its input: each item gets its own (not a shared constant)
    assert not torch.allclose(lv[0], lv[1]) and not torch.allclose(tlv[0], tlv[2])
    # ...and nothing squashes it: with the last layer reduced to its bias, the head returns that
    # bias exactly, far outside [0, 1], non-zero mean, not of norm 1 (no sigmoid, no LayerNorm,
    # no L2, no clamp)
    target = torch.linspace(-12.0, 6.0, 16)
    with torch.no_grad():
        for head in (m.image.head, m.text.head):
            head.fc_var.weight.zero_()
            head.fc_var.bias.copy_(target)
    torch.testing.assert_close(m.image(images)[1], target.expand(3, 16))
    torch.testing.assert_close(m.text(tokens, lengths)[1], target.expand(3, 16))


def test_text_encoder_ignores_padding():
    torch.manual_seed(0)
    m = PCME(tiny_cfg()).eval()
    short, ls = pad_tokens([[1, 4, 5, 2]])
    padded = torch.cat([short, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    a = m.text(short, ls)
    b = m.text(padded, ls)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_checkpoint_rebuilds_model_alone(tmp_path):
    torch.manual_seed(0)
    m = PCME(tiny_cfg()).eval()
    save_checkpoint(tmp_path / "c.pt", m, epoch=1)
    m2, vocab, ckpt = load_model(tmp_path / "c.pt", torch.device("cpu"))
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(m.image(x)[1], m2.image(x)[1])
    assert vocab.words == VOCAB and ckpt["epoch"] == 1
    torch.testing.assert_close(m.a, m2.a)


def test_checkpoint_sha_mismatch_and_garbage(tmp_path):
    m = PCME(tiny_cfg())
    save_checkpoint(tmp_path / "c.pt", m)
    with pytest.raises(PcmeError, match="sha256"):
        load_model(tmp_path / "c.pt", torch.device("cpu"), expected_sha256="0" * 64)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PcmeError, match="bad.pt"):
        load_model(tmp_path / "bad.pt", torch.device("cpu"))


def test_resnet_weights_load_from_a_torchvision_state_dict(tmp_path):
    torch.manual_seed(1)
    ref = ResNet(BasicBlock, [1, 1, 1, 1])  # torchvision layout, width 64, standard stem
    torch.save(ref.state_dict(), tmp_path / "r.pth")
    cfg = ModelConfig(resnet_width=64, small_stem=False, resnet_weights=str(tmp_path / "r.pth"))
    net = build_resnet(cfg)
    torch.testing.assert_close(net.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    bad = ModelConfig(resnet_width=32, resnet_weights=str(tmp_path / "r.pth"))
    with pytest.raises(PcmeError, match="does not fit"):
        build_resnet(bad)
