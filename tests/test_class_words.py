"""Class words (encoders/model/class_words.py): the ImageNet classifier's class names, as word
vectors, join both towers' μ through one shared map."""

import numpy as np
import pytest
import torch

from core.errors import PcmeError
from encoders.model.checkpoint import load_model, save_checkpoint
from encoders.model.class_words import (DECAY, GLOSS_WEIGHT, N_CLASSES, class_word_groups,
                                        class_word_table, imagenet_class_names, name_words)
from encoders.model.config import ModelConfig
from encoders.model.networks import PCME

VOCAB = ["<pad>", "<start>", "<end>", "<unk>", "a", "koala", "shark"]
CW = dict(backbone="efficientnet-lite0", image_size=32, embed_dim=16, gru_hidden=16, attn_hidden=8,
          word_dim=4, vocab=VOCAB, class_words=True, imagenet_weights=False)


def test_name_words_and_table_average_the_known_words():
    assert name_words("great white shark") == ["great", "white", "shark"]
    assert name_words("jack-o'-lantern") == ["jack", "o", "lantern"]
    vec = {"great": np.array([1.0, 0.0]), "shark": np.array([0.0, 3.0]), "koala": np.array([2.0, 2.0])}
    groups = [[(1.0, name_words(n))] for n in ("great white shark", "koala", "xyzzy")]
    table = class_word_table(groups, vec, dim=2)
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
    cfg = TrainConfig(glove=str(glove), min_word_count=1,   # names: the table is hand-checkable
                      model=ModelConfig(**{**CW, "vocab": [], "word_dim": 50,
                                           "class_word_source": "names"}))
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


def test_a_lite0_run_with_class_words_gets_a_class_channel_unless_it_says_otherwise():
    from encoders.training.config import LITE0_CLASS_CHANNEL, load_train_config

    def channel(**model):
        return load_train_config(None, {"model": model}).model.class_channel

    assert channel(backbone="efficientnet-lite0") == LITE0_CLASS_CHANNEL == 0.5
    assert channel(backbone="efficientnet-lite0", class_words=True) == 0.5
    assert channel(backbone="efficientnet-lite0", class_channel=0.0) == 0.0
    assert channel(backbone="efficientnet-lite0", class_channel=0.75) == 0.75
    assert channel(backbone="efficientnet-lite0", class_words=False) == 0.0
    assert channel(backbone="resnet") == 0.0
    assert ModelConfig(backbone="efficientnet-lite0", class_words=True).class_channel == 0.0


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


def test_class_word_table_weighs_each_group_mean():
    vec = {"a": np.array([3.0, 0.0]), "b": np.array([0.0, 2.0]), "c": np.array([2.0, 2.0]),
           "d": np.array([0.0, 10.0])}
    groups = [[(1.0, ["a"]), (1.0, ["b", "c", "zz"]), (0.7, ["d"]), (0.49, ["zz"])]]
    # (1·a + 1·mean(b, c) + 0.7·d) / 2.7; the group with no known word does not count
    expected = (np.array([3.0, 0.0]) + np.array([1.0, 2.0]) + 0.7 * np.array([0.0, 10.0])) / 2.7
    np.testing.assert_allclose(class_word_table(groups, vec, dim=2)[0], expected, rtol=1e-6)


def test_wordnet_groups_say_what_the_classifier_names_mean():
    names = imagenet_class_names()
    groups = class_word_groups("wordnet")
    assert len(groups) == N_CLASSES

    def words(name, at):  # at: 1 = synonyms, 2.. = hypernym levels
        return set(groups[names.index(name)][at][1])
    assert "husky" in words("Eskimo dog", 1) and "dog" in words("Eskimo dog", 3)
    assert "horse" in words("sorrel", 2)                 # a sorrel is a horse
    assert {"trash", "garbage"} <= words("ashcan", 1)
    assert "tool" in words("hammer", 2)                  # the hand tool, not the gun's hammer
    assert [w for w, _ in groups[names.index("sorrel")]] == [1.0, 1.0, DECAY, DECAY**2, DECAY**3]
    assert groups[names.index("koala")][0] == (1.0, ["koala"])      # the name comes first
    glossed = class_word_groups("wordnet-gloss")[names.index("sorrel")]   # + its definition
    assert glossed[:-1] == groups[names.index("sorrel")] and glossed[-1][0] == GLOSS_WEIGHT
    assert glossed[-1][1] == ["horse", "brownish", "orange", "light", "brown", "color"]
    with pytest.raises(PcmeError, match="class_word_source 'synsets' is unknown"):
        class_word_groups("synsets")


def test_wordnet_classes_matches_homonyms_in_offset_order(tmp_path):
    """A four-line data.noun: classes are matched to synsets with increasing offsets, homonyms
    by that order first, then by the plain sense (lex_id 0)."""
    from encoders.model import wordnet_classes as wc

    lines = ["  1 license header line\n",
             "00000050 05 n 01 bird 0 000 | a bird\n",
             "00000100 05 n 01 crane 0 001 @ 00000050 n 0000 | a wading bird; "
             "\"cranes stood there\"\n",
             "00000200 06 n 02 hammer 4 cock 0 000 | part of a gunlock\n",
             "00000205 06 n 01 hand_tool 0 000 | a tool\n",
             "00000210 06 n 01 hammer 0 001 @ 00000205 n 0000 | a hand tool\n",
             "00000300 06 n 01 crane 1 001 @ 00000250 n 0000 | lifts things\n",
             "00000250 06 n 01 lifting_device 0 000 | a device\n"]
    (tmp_path / "data.noun").write_text("".join(lines), encoding="latin-1")
    table = wc.build(["crane", "hammer", "crane", "unicorn"], tmp_path)
    got = [(c["synonyms"], c["hypernyms"]) for c in table["classes"]]
    assert got == [(["crane"], [["bird"]]), (["hammer"], [["hand tool"]]),
                   (["crane"], [["lifting device"]]), ([], [])]
    assert table["matched"] == 3
    # the definition's content words; the quoted example and the short and stop words left out
    assert [c["gloss"] for c in table["classes"]] == [["wading", "bird"], ["hand", "tool"],
                                                      ["lifts", "things"], []]
    with pytest.raises(SystemExit, match="apt-get install -y wordnet-base"):
        wc.build(["crane"], tmp_path / "missing")


def test_a_checkpoint_from_before_the_source_key_says_names():
    from dataclasses import asdict

    from encoders.model.config import model_config_from_dict

    saved = asdict(ModelConfig(**CW))
    assert model_config_from_dict(saved).class_word_source == "wordnet"   # today's default
    del saved["class_word_source"]
    assert model_config_from_dict(saved).class_word_source == "names"     # what it was built with


def test_a_wordnet_table_out_of_step_with_torchvision_names_the_fix(tmp_path, monkeypatch):
    import json

    from encoders.model import class_words

    names = imagenet_class_names()
    classes = [{"name": n, "synonyms": [], "hypernyms": []} for n in names]
    classes[3]["name"] = "not a shark"
    (tmp_path / "t.json").write_text(json.dumps({"classes": classes}))
    monkeypatch.setattr(class_words, "WORDNET_TABLE", tmp_path / "t.json")
    with pytest.raises(PcmeError, match="class 3 is 'not a shark' there but 'tiger shark' in "
                                        "torchvision; rewrite it with: python -m encoders"):
        class_word_groups("wordnet")
