"""Class words (encoders/model/class_words.py): the ImageNet classifier's class names, as word
vectors, join both towers' μ through one shared map."""
import numpy as np
import pytest
import torch

from core.errors import PcmeError
from encoders.model.checkpoint import load_model, save_checkpoint
from encoders.model.class_words import (N_CLASSES, class_word_table, imagenet_class_names,
                                        name_words)
from encoders.model.config import ModelConfig
from encoders.model.networks import PCME

VOCAB = ["<pad>", "<start>", "<end>", "<unk>", "a", "koala", "shark"]
CW = dict(backbone="efficientnet-lite0", image_size=32, embed_dim=16, gru_hidden=16, attn_hidden=8,
          word_dim=4, vocab=VOCAB, class_words=True, imagenet_weights=False)


def test_name_words_and_table_average_the_known_words():
    assert name_words("great white shark") == ["great", "white", "shark"]
    assert name_words("jack-o'-lantern") == ["jack", "o", "lantern"]
    vec = {"great": np.array([1.0, 0.0]), "shark": np.array([0.0, 3.0]), "koala": np.array([2.0, 2.0])}
    table = class_word_table(["great white shark", "koala", "xyzzy"], vec, dim=2)
    # "white" is unknown: the mean is over great and shark; a name with no known word is zeros
    np.testing.assert_allclose(table, [[0.5, 1.5], [2.0, 2.0], [0.0, 0.0]])
    assert table.dtype == np.float32


def test_imagenet_names_are_in_classifier_order():
    names = imagenet_class_names()
    assert len(names) == N_CLASSES
    # well-known ImageNet-1k indices
    assert (names[0], names[105], names[207], names[555]) == (
        "tench", "koala", "golden retriever", "fire engine")


def seeded_model():
    torch.manual_seed(0)
    model = PCME(ModelConfig(**CW)).eval()
    model.set_class_words(torch.randn(N_CLASSES, 4))
    return model


def test_one_map_serves_both_towers_and_the_image_term_is_the_class_mixture():
    model = seeded_model()
    assert model.image.class_map is model.text.class_map
    n_shared = sum(p.numel() for p in model.image.class_map.parameters())
    assert sum(p.numel() for p in model.parameters()) == (
        sum(p.numel() for p in model.image.parameters()) + sum(p.numel() for p in model.text.parameters())
        - n_shared + 2)  # the shared map counted once, plus a and b
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pooled = model.image.features(x).mean(dim=(2, 3))
        logits = pooled @ model.image.backbone._fc.weight.T + model.image.backbone._fc.bias
        mixture = torch.softmax(logits, dim=-1) @ model.image.class_words
        want = mixture @ model.image.class_map.weight.T + model.image.class_map.bias
        got = model.image.class_term(pooled)
    assert torch.allclose(got, want, atol=1e-5)
    # the term reaches μ: zeroing the map changes the image embedding
    with torch.no_grad():
        mu, _ = model.image(x)
        model.image.class_map.weight.zero_()
        mu0, _ = model.image(x)
    assert not torch.allclose(mu, mu0, atol=1e-4)


def test_checkpoint_rebuilds_the_shared_map_and_table(tmp_path):
    model = seeded_model()
    save_checkpoint(tmp_path / "c.pt", model)
    tokens, lengths = torch.tensor([[1, 4, 5, 2], [1, 6, 2, 0]]), torch.tensor([4, 3])
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    full, _, _ = load_model(tmp_path / "c.pt", torch.device("cpu"))
    text_only, _, _ = load_model(tmp_path / "c.pt", torch.device("cpu"), towers=("text",))
    assert full.image.class_map is full.text.class_map
    assert torch.equal(full.image.class_words, model.image.class_words)
    with torch.no_grad():
        for a, b in zip(model.text(tokens, lengths), text_only.text(tokens, lengths)):
            assert torch.equal(a, b)
        for a, b in zip(model.image(x), full.image(x)):
            assert torch.allclose(a, b, atol=1e-6)


def test_class_words_need_the_lite0_classifier():
    with pytest.raises(PcmeError, match="class_words needs the efficientnet-lite0 backbone"):
        PCME(ModelConfig(**{**CW, "backbone": "resnet"}))
    model = seeded_model()
    with pytest.raises(PcmeError, match="class-word table"):
        model.set_class_words(torch.zeros(10, 4))


def test_a_glove_text_file_is_read_once_for_vocabulary_and_class_names(tmp_path, monkeypatch):
    from encoders.model import text
    from encoders.training.config import TrainConfig
    from encoders.training.data.base import Split
    from encoders.training.train import build_model

    glove = tmp_path / "glove.txt"
    glove.write_text("a 1 0 0 0\nkoala 0 2 0 0\ngreat 0 0 4 0\nshark 0 0 0 8\n")
    reads = []
    real = text._glove_text
    monkeypatch.setattr(text, "_glove_text", lambda path, wanted: reads.append(path) or real(path, wanted))
    split = Split("folder", "train", tmp_path, ["x.png"], ["x"], ["a koala"], [0])
    cfg = TrainConfig(glove=str(glove), min_word_count=1,
                      model=ModelConfig(**{**CW, "vocab": [], "word_dim": 50}))
    model = build_model(cfg, split)
    assert len(reads) == 1 and model.cfg.word_dim == 4
    table = model.image.class_words
    names = imagenet_class_names()
    assert torch.equal(table[names.index("koala")], torch.tensor([0.0, 2.0, 0.0, 0.0]))
    # "great white shark": great and shark known, white not -> their mean
    assert torch.equal(table[names.index("great white shark")], torch.tensor([0.0, 0.0, 2.0, 4.0]))
    assert torch.equal(table[0], torch.zeros(4))  # tench: unknown to this file
    koala = model.text.embed.weight[model.cfg.vocab.index("koala")]
    assert torch.equal(koala, torch.tensor([0.0, 2.0, 0.0, 0.0]))


def test_train_refuses_class_words_without_lite0_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    res = CliRunner().invoke(app, ["train", "--class-words", "--root", str(tmp_path / "data"),
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code == 2, res.output
    assert "class_words needs backbone efficientnet-lite0" in res.output
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_a_lite0_run_gets_class_words_unless_it_says_otherwise(tmp_path):
    from encoders.training.config import load_train_config

    def words(model=None, toml=None):
        path = None
        if toml is not None:
            path = tmp_path / "c.toml"
            path.write_text(toml)
        return load_train_config(path, {"model": model or {}}).model.class_words

    assert words({"backbone": "efficientnet-lite0"}) is True
    assert words({"backbone": "efficientnet-lite0", "class_words": False}) is False
    assert words(toml='[model]\nbackbone = "efficientnet-lite0"\nclass_words = false\n') is False
    assert words(toml='[model]\nbackbone = "efficientnet-lite0"\n') is True
    assert words() is False and words({"backbone": "resnet"}) is False
    assert ModelConfig(backbone="efficientnet-lite0").class_words is False  # checkpoints unchanged


@pytest.mark.parametrize("gain", [3.0, 0.5])
def test_the_class_map_starts_orthogonal_at_its_gain(gain):
    """W's columns start orthogonal with norm `gain` (WᵀW = gain²·I) and no bias, so the class
    term keeps the word vectors' geometry: ⟨Wu, Wv⟩ = gain²·⟨u, v⟩ for any two word vectors."""
    torch.manual_seed(0)
    w = PCME(ModelConfig(**CW, class_map_gain=gain)).image.class_map
    torch.testing.assert_close(w.weight.T @ w.weight, gain ** 2 * torch.eye(4), atol=1e-5, rtol=0)
    assert torch.equal(w.bias, torch.zeros(16))
    u, v = torch.randn(4), torch.randn(4)
    assert float(w(u) @ w(v)) == pytest.approx(gain ** 2 * float(u @ v), rel=1e-4, abs=1e-5)


def test_class_map_gain_zero_keeps_pytorchs_default_init():
    torch.manual_seed(0)
    w = PCME(ModelConfig(**CW, class_map_gain=0.0)).image.class_map
    bound = 1 / 4 ** 0.5  # nn.Linear: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias
    assert w.weight.abs().max() <= bound and w.bias.abs().max() <= bound
    assert w.bias.abs().max() > 0
    gram = w.weight.T @ w.weight
    assert not torch.allclose(gram, gram[0, 0] * torch.eye(4), atol=1e-2)
