"""Open vocabulary: a word training never saw takes its GloVe vector through the learned map."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from encoders.model.open_vocab import GloveTable, OpenVocab, fit_glove_map
from encoders.model.query import QueryEncoder
from encoders.model.text import UNK
from encoders.training.data import load_split


def test_fit_glove_map_recovers_a_linear_drift_and_shrinks_to_identity():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(200, 6))
    b = np.eye(6) + 0.3 * rng.normal(size=(6, 6))
    assert np.allclose(fit_glove_map(g, g @ b, ridge=1e-9), b, atol=1e-5)  # exact least squares
    assert np.allclose(fit_glove_map(g, g @ b, ridge=1e9), np.eye(6), atol=1e-4)  # all prior


@pytest.fixture(scope="module")
def encoder(trained):
    return QueryEncoder.from_checkpoint(trained / "run" / "checkpoint.pt", "cpu")


def test_held_out_word_lands_next_to_its_trained_glove_neighbour(encoder):
    words = encoder.vocab.vocab.index
    assert "puppy" not in words and "kitten" not in words  # never in the scenes captions
    trained = ["dog", "cat", "car", "bus", "boat", "horse", "bird", "bench", "train", "tree"]
    assert all(w in words for w in trained)
    mu_trained = np.stack([encoder.encode_text(f"a {w}")[0] for w in trained])
    for new, neighbour in (("puppy", "dog"), ("kitten", "cat")):
        mu, _, unknown = encoder.encode_text(f"a {new}")
        assert unknown == []
        assert trained[int(np.argmax(mu_trained @ mu))] == neighbour
    # the closed vocabulary drops the word: "a puppy" and "a kitten" become the same "a <unk>"
    closed = encoder.vocab.vocab
    mu_closed, _ = encoder.tower.forward(*closed.encode_batch(["a puppy", "a kitten"])[:2])
    assert np.allclose(mu_closed[0], mu_closed[1])
    assert closed.encode("a puppy")[0][2] == closed.index[UNK]


def test_only_words_glove_does_not_know_are_unknown(encoder):
    _, _, unknown = encoder.encode_text("a purple giraffe qqzzxw near the station")
    assert unknown == ["qqzzxw"]
    ids, extra, unknown = encoder.vocab.encode_batch(["a giraffe giraffe", "the dog"])
    base = len(encoder.vocab.vocab)
    assert ids[0][2] == ids[0][3] == base and extra.shape == (1, 50)  # one extra row, shared
    expected = GloveTable().vectors(["giraffe"])["giraffe"] @ encoder.vocab.map
    assert np.allclose(extra[0], expected)
    assert unknown == [[], []]


def test_model_without_glove_width_falls_back_to_the_closed_vocabulary(encoder):
    narrow = SimpleNamespace(text=SimpleNamespace(embed=torch.nn.Embedding(10, 8)))  # 8-d words
    assert OpenVocab.for_model(narrow, encoder.vocab.vocab) is encoder.vocab.vocab


def test_eval_open_vocab_reads_captions_as_query_does(trained, monkeypatch):
    """`eval --open-vocab` hands evaluation the query encoder's vocabulary: a held-out word is
    its GloVe vector through the map, not <unk>; without the flag it stays <unk>."""
    from encoders.model.open_vocab import OpenVocab
    from encoders.training import pipeline

    seen = {}

    def fake_evaluate_split(model, vocab, split, device, scores, queries=None):
        seen["ids"], seen["extra"], _ = vocab.encode_batch(["a puppy"])
        seen["queries"] = queries   # the captions as text queries: open vocabulary only
        return {"split": split.name}

    monkeypatch.setattr(pipeline, "evaluate_split", fake_evaluate_split)
    ckpt = str(trained / "run" / "checkpoint.pt")
    args = (ckpt, "scenes", str(trained / "data"), "test", ("elk",), "cpu")
    report = pipeline.evaluate_checkpoint(*args, open_vocab=True)
    query = QueryEncoder.from_checkpoint(ckpt, "cpu").vocab
    assert isinstance(query, OpenVocab) and report["vocabulary"] == "open"
    want_ids, want_extra, _ = query.encode_batch(["a puppy"])
    assert seen["ids"] == want_ids and np.allclose(seen["extra"], want_extra)
    assert seen["queries"][0].shape[0] == len(load_split("scenes", trained / "data", "test").captions)
    report = pipeline.evaluate_checkpoint(*args)
    assert report["vocabulary"] == "closed" and seen["extra"] is None and seen["queries"] is None
    assert seen["ids"][0][2] == query.vocab.index[UNK]


def test_frozen_word_vectors_stay_glove_while_the_gru_learns():
    """freeze_word_vectors: an optimiser step moves the GRU but not one word vector, so the
    open-vocabulary map fitted on them is the identity (unseen words enter as they are)."""
    from encoders.model.config import ModelConfig
    from encoders.model.networks import PCME
    from encoders.training.config import TrainConfig
    from encoders.training.schedule import make_optimizer

    words = ["<pad>", "<start>", "<end>", "<unk>", "dog", "cat", "car", "bus", "tree", "boat"]
    cfg = ModelConfig(image_size=16, embed_dim=8, resnet_width=4, gru_hidden=8, attn_hidden=4,
                      vocab=words, freeze_word_vectors=True)
    torch.manual_seed(0)
    model = PCME(cfg)
    glove = torch.randn(len(words), cfg.word_dim)
    model.set_word_vectors(glove)
    gru_before = model.text.gru.weight_ih_l0.detach().clone()
    opt, _ = make_optimizer(model, TrainConfig(), steps_per_epoch=1)
    mu, _ = model.text(torch.tensor([[1, 4, 2], [1, 5, 2]]), torch.tensor([3, 3]))
    (mu[0] - mu[1]).pow(2).sum().neg().backward()
    opt.step()
    assert torch.equal(model.text.embed.weight, glove)
    assert not torch.equal(model.text.gru.weight_ih_l0, gru_before)
    g = glove[4:].double().numpy()
    assert np.allclose(fit_glove_map(g, g), np.eye(cfg.word_dim), atol=1e-6)
