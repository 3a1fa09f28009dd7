"""The class channel (encoders/model/class_terms.py: ClassChannel): an untrained zero-shot signal
appended to μ, in class space (the default) or in word space."""
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch

from core.errors import PcmeError
from encoders.model.checkpoint import load_model, save_checkpoint
from encoders.model.class_words import N_CLASSES
from encoders.model.config import ModelConfig, model_config_from_dict
from encoders.model.networks import PCME

VOCAB = ["<pad>", "<start>", "<end>", "<unk>", "a", "koala", "shark"]
CW = dict(backbone="efficientnet-lite0", image_size=32, embed_dim=16, gru_hidden=16, attn_hidden=8,
          word_dim=4, vocab=VOCAB, class_words=True, imagenet_weights=False)
TOKENS, LENGTHS = torch.tensor([[1, 4, 5, 2], [1, 6, 2, 0]]), torch.tensor([4, 3])


def softmax64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_the_class_space_channel_appends_the_bhattacharyya_coefficient(tmp_path):
    """class_channel_space = "classes": the appended dims' inner product is β·s times the
    Bhattacharyya coefficient Σ_k √(p_k q_k) of the photo's softmax(logits / T) and the caption's
    softmax(cos(pooled word vector, g_k) / τ), computed here in float64 from the towers' own
    pieces (s = word_dim / 1000: the channel weighs as word_dim dims, its log σ² is the learned
    value + log s); μ stays unit-norm, the output is embed_dim + 1000 wide, the text tower keeps its own
    copy of the class-word table, and a text-only model rebuilt from the checkpoint gives the
    same vectors."""
    beta, tau, temp = 0.4, 0.1, 3.0
    torch.manual_seed(0)
    cfg = ModelConfig(**CW, class_channel=beta, class_channel_word_temp=tau,
                      class_channel_image_temp=temp)
    assert cfg.class_channel_space == "classes" and cfg.out_dim == 16 + N_CLASSES
    model = PCME(cfg).eval()
    table = torch.randn(N_CLASSES, 4)
    model.set_class_words(table)
    assert torch.equal(model.text.channel.class_words, table)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        t_mu, t_lv = model.text(TOKENS, LENGTHS)
        i_mu, i_lv = model.image(x)
        pooled_words = model.text.word_attn(model.text.embed(TOKENS),
                                            torch.arange(4)[None] >= LENGTHS[:, None])
        logits = model.image.backbone._fc(model.image.features(x).mean(dim=(2, 3)))
    assert t_mu.shape == i_lv.shape == (2, 16 + N_CLASSES)
    torch.testing.assert_close(t_mu.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(i_mu.norm(dim=1), torch.ones(2))
    w = pooled_words.numpy().astype(np.float64)
    g = table.numpy().astype(np.float64)
    cos = (w / np.linalg.norm(w, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1,
                                                                                keepdims=True)).T
    q, p = softmax64(cos / tau), softmax64(logits.numpy() / temp)
    bc = np.sqrt(q[:, None, :] * p[None, :, :]).sum(-1)
    assert 0.05 < bc.min() and bc.max() < 0.95   # neither disjoint nor identical: a real check
    scale = 4 / N_CLASSES   # the channel weighs as word_dim = 4 dimensions
    assert cfg.class_channel_scale == scale
    np.testing.assert_allclose((t_mu[:, 16:] @ i_mu[:, 16:].T).numpy(), beta * scale * bc,
                               rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(t_lv[:, 16:], torch.full((2, N_CLASSES), cfg.init_log_var
                                                        + float(np.log(scale))))
    save_checkpoint(tmp_path / "c.pt", model)
    back, _, _ = load_model(tmp_path / "c.pt", torch.device("cpu"), towers=("text",))
    assert back.cfg.class_channel_space == "classes"
    with torch.no_grad():
        for a, b in zip(model.text(TOKENS, LENGTHS), back.text(TOKENS, LENGTHS)):
            assert torch.equal(a, b)


def test_a_checkpoint_from_before_these_keys_has_the_word_space_channel_and_no_open_word_term():
    saved = asdict(ModelConfig(**CW, class_channel=0.5))
    assert model_config_from_dict(saved).class_channel_space == "classes"   # today's default
    assert model_config_from_dict(saved).open_word_log_var == ModelConfig.open_word_log_var > 0
    del saved["class_channel_space"], saved["open_word_log_var"]
    old = model_config_from_dict(saved)
    assert old.class_channel_space == "words" and old.out_dim == 16 + 4
    assert old.open_word_log_var == 0.0


def test_the_word_space_channel_appends_the_zero_shot_cosine_to_mu(tmp_path):
    """class_channel = β, class_channel_space = "words": μ = [√(1−β)·μ_head, √β·ĉ] stays
    unit-norm, the appended dims' inner product between a caption and a photo is β times the
    cosine of the caption's pooled word vectors with the photo's class-word mixture
    (photos_eval.py --zero-shot), their log σ² is one learned value, and a checkpoint rebuilds
    it; it needs class words."""
    beta = 0.3
    torch.manual_seed(0)
    model = PCME(ModelConfig(**CW, class_channel=beta, class_channel_space="words")).eval()
    model.set_class_words(torch.randn(N_CLASSES, 4))
    with torch.no_grad():
        model.text.channel.log_var.fill_(-5.0)
    assert model.cfg.out_dim == 16 + 4
    tokens, lengths = TOKENS, LENGTHS
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        t_mu, t_lv = model.text(tokens, lengths)
        i_mu, i_lv = model.image(x)
        words = model.text.embed(tokens)
        pad = torch.arange(4)[None] >= lengths[:, None]
        pooled_words = model.text.word_attn(words, pad)
        mixture = model.image.class_mixture(
            model.image.backbone._fc(model.image.features(x).mean(dim=(2, 3))))
    assert t_mu.shape == (2, 20) and i_lv.shape == (2, 20)
    torch.testing.assert_close(t_mu.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(i_mu.norm(dim=1), torch.ones(2))
    cos = torch.nn.functional.cosine_similarity(pooled_words[:, None], mixture[None], dim=-1)
    torch.testing.assert_close(t_mu[:, 16:] @ i_mu[:, 16:].T, beta * cos)
    assert torch.all(t_lv[:, 16:] == -5.0) and torch.all(i_lv[:, 16:] == model.cfg.init_log_var)
    save_checkpoint(tmp_path / "c.pt", model)
    back, _, _ = load_model(tmp_path / "c.pt", torch.device("cpu"), towers=("text",))
    with torch.no_grad():
        for a, b in zip(model.text(tokens, lengths), back.text(tokens, lengths)):
            assert torch.equal(a, b)
    with pytest.raises(PcmeError, match="class_channel needs class_words"):
        PCME(ModelConfig(**{**CW, "class_words": False}, class_channel=beta))


@pytest.mark.parametrize("model, message", (
    ('backbone = "efficientnet-lite0"\nclass_channel = 1.0',
     "class_channel 1.0 must lie in [0, 1)"),
    ('backbone = "efficientnet-lite0"\nclass_words = false\nclass_channel = 0.5',
     "class_channel needs class_words"),
    ('backbone = "efficientnet-lite0"\nclass_channel_space = "pixels"',
     "class_channel_space 'pixels' is unknown; choose one of classes, words"),
    ('backbone = "efficientnet-lite0"\nclass_channel_word_temp = 0',
     "class_channel_word_temp 0.0 must be > 0")))
def test_a_config_with_a_class_channel_it_cannot_have_is_refused(tmp_path, model, message):
    from encoders.training.config import load_train_config

    (tmp_path / "c.toml").write_text(f"[model]\n{model}\n")
    with pytest.raises(PcmeError, match=re.escape(message)):
        load_train_config(tmp_path / "c.toml", {})


def test_a_query_with_words_training_never_saw_is_less_certain_in_its_learned_dims():
    """open_word_log_var = Λ: a text query whose token addresses an open-vocabulary row gets
    log σ² + Λ·(its word attention on that token) on the learned dims only; μ, the channel's
    dims, a text of trained words and the same text encoded as an item (not a query) are
    unchanged."""
    lam = 4.0
    torch.manual_seed(0)
    model = PCME(ModelConfig(**CW, class_channel=0.5, open_word_log_var=lam)).eval()
    model.set_class_words(torch.randn(N_CLASSES, 4))
    extra = torch.randn(1, 4)
    opened = torch.tensor([[1, 4, 7, 2], [1, 6, 2, 0]])   # id 7 = len(VOCAB): the extra row
    with torch.no_grad():
        base_lv = model.text(TOKENS, LENGTHS)[1]
        mu, lv = model.text(opened, LENGTHS, extra, query=True)
        item_lv = model.text(opened, LENGTHS, extra)[1]
        closed_lv = model.text(opened.clamp(max=6), LENGTHS, extra, query=True)[1]  # no open word
        words = torch.cat([model.text.embed.weight, extra])[opened]
        share = model.text.word_attn.weights(words, torch.arange(4)[None] >= LENGTHS[:, None])[0, 2]
        plain = PCME(ModelConfig(**CW, class_channel=0.5, open_word_log_var=0.0)).eval()
        plain.load_state_dict(model.state_dict())
        plain_mu, plain_lv = plain.text(opened, LENGTHS, extra)
    assert 0.05 < float(share) < 0.95
    torch.testing.assert_close(mu, plain_mu)
    torch.testing.assert_close(lv[0, :16], plain_lv[0, :16] + lam * share)
    torch.testing.assert_close(lv[0, 16:], plain_lv[0, 16:])
    torch.testing.assert_close(lv[1], plain_lv[1])          # the second text has no open word
    torch.testing.assert_close(item_lv, plain_lv)
    with torch.no_grad():
        torch.testing.assert_close(closed_lv, plain.text(opened.clamp(max=6), LENGTHS, extra)[1])
    torch.testing.assert_close(base_lv[1], lv[1])
