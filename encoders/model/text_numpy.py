"""The trained text tower in numpy: a text query answered without importing torch.

A one-shot query encodes a handful of words, yet `import torch` alone takes 2-4 s on a small
CPU. This is TextEncoder.forward (encoders/model/networks.py) in eval mode, float32, on the
weights read by encoders/model/checkpoint_reader.py: the same μ and log σ² up to float32
rounding (the tests hold it to the torch tower). It imports numpy and the project's torch-free
modules only; a change to TextEncoder must be made here too (tests/test_text_numpy.py fails
until it is).

The bi-GRU runs both directions of every sequence in one loop over positions, each sequence
over its own length (what pack_padded_sequence gives): step s reads position s forward and
T-1-s backward; a sequence whose length does not cover the position keeps its state (so the
backward direction starts at its last real token with h = 0) and outputs zero there.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from core.errors import PcmeError

from encoders.model.checkpoint_reader import read_checkpoint_numpy
from encoders.model.class_words import N_CLASSES
from encoders.model.config import ModelConfig, model_config_from_dict
from encoders.model.text import Vocab

BATCH = 256             # sequences per pass: bounds the [B, T, 6H] input projections' memory
LAYER_NORM_EPS = 1e-5   # nn.LayerNorm's default
NORMALIZE_EPS = 1e-12   # F.normalize's default


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) = inf for very negative x: sigmoid is 0 there
        return 1 / (1 + np.exp(-x))


def _unit(x: np.ndarray) -> np.ndarray:
    """F.normalize over the last axis."""
    norm = np.sqrt((x * x).sum(-1, keepdims=True))
    return x / np.maximum(norm, np.float32(NORMALIZE_EPS))


def _sqrt_softmax(x: np.ndarray) -> np.ndarray:
    """exp(log_softmax(x) / 2) over the last axis."""
    x = x - x.max(-1, keepdims=True)
    return np.exp(0.5 * (x - np.log(np.exp(x).sum(-1, keepdims=True))))


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """TextEncoder's state_dict keys (without "text.") and shapes, as `cfg` builds it."""
    d, h, e, a = cfg.word_dim, cfg.gru_hidden, cfg.embed_dim, cfg.attn_hidden
    shapes = {"embed.weight": (len(cfg.vocab), d)}
    for tail in ("l0", "l0_reverse"):
        shapes |= {f"gru.weight_ih_{tail}": (3 * h, d), f"gru.weight_hh_{tail}": (3 * h, h),
                   f"gru.bias_ih_{tail}": (3 * h,), f"gru.bias_hh_{tail}": (3 * h,)}

    def pool(name: str, dim: int):
        return {f"{name}.proj.weight": (a, dim), f"{name}.proj.bias": (a,),
                f"{name}.score.weight": (1, a)}

    for name in ("fc", "fc_attn", "fc_var"):
        shapes |= {f"head.{name}.weight": (e, h), f"head.{name}.bias": (e,)}
    shapes |= pool("head.attn_mu", h) | pool("head.attn_var", h)
    shapes |= {"head.norm.weight": (e,), "head.norm.bias": (e,)}
    if cfg.class_words:
        shapes |= {"class_map.weight": (e, d), "class_map.bias": (e,)} | pool("word_attn", d)
    if cfg.class_channel > 0:
        shapes["channel.log_var"] = ()
        if cfg.class_channel_space == "classes":
            shapes["channel.class_words"] = (N_CLASSES, d)
    return shapes


class NumpyTextTower:
    """TextEncoder of a trained model, numpy only. `forward(ids, extra)` takes what
    Vocab/OpenVocab.encode_batch give and returns (μ [B, out_dim], log σ² [B, out_dim])."""

    def __init__(self, cfg: ModelConfig, state: Mapping[str, np.ndarray],
                 source: str = "text tower"):
        """state: the text tower's state_dict as arrays, keys without "text." (any float dtype:
        copied to float32, as load_state_dict does). `source` names it in errors."""
        if not cfg.vocab:
            raise PcmeError(f"{source}: model config has an empty vocabulary")
        if cfg.class_channel > 0 and not cfg.class_words:
            raise PcmeError(f"{source}: class_channel needs class_words")
        w: dict[str, np.ndarray] = {}
        for key, shape in _expected_shapes(cfg).items():
            if key not in state:
                raise PcmeError(f"{source}: no text.{key} weights (the model config asks for "
                                f"them)")
            w[key] = np.array(state[key], dtype=np.float32)  # a copy: the file may go
            if w[key].shape != shape:
                raise PcmeError(f"{source}: text.{key} is {w[key].shape}, the model config "
                                f"makes it {shape}")
        self.cfg, self.vocab, self._w = cfg, Vocab(cfg.vocab), w
        self.word_vectors = w["embed.weight"]
        # class space: the class-word table's unit rows, transposed once (not per query)
        self._class_units = (np.ascontiguousarray(_unit(w["channel.class_words"]).T)
                             if "channel.class_words" in w else None)
        self.hidden = cfg.gru_hidden
        # both directions' input projections in one matrix [word_dim, 6H]; recurrent ones
        # stacked [2, H, 3H] for one batched matmul per step
        tails = ("l0", "l0_reverse")
        self._w_ih = np.ascontiguousarray(
            np.concatenate([w[f"gru.weight_ih_{t}"] for t in tails]).T)
        self._b_ih = np.concatenate([w[f"gru.bias_ih_{t}"] for t in tails])
        self._w_hh = np.ascontiguousarray(np.stack([w[f"gru.weight_hh_{t}"].T for t in tails]))
        self._b_hh = np.stack([w[f"gru.bias_hh_{t}"] for t in tails])[:, None, :]

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "NumpyTextTower":
        """The text tower of a checkpoint (encoders/model/checkpoint.py), torch not imported."""
        ckpt = read_checkpoint_numpy(path)
        if "model_config" not in ckpt or not isinstance(ckpt.get("model"), Mapping):
            raise PcmeError(f"checkpoint {path}: not a pcme-search checkpoint")
        try:
            cfg = model_config_from_dict(ckpt["model_config"])
        except TypeError as e:  # a key this version does not know
            raise PcmeError(f"checkpoint {path}: model_config does not fit this version "
                            f"({e})") from None
        state = {k[len("text."):]: v for k, v in ckpt["model"].items() if k.startswith("text.")}
        return cls(cfg, state, source=f"checkpoint {path}")

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self._w[f"{name}.weight"].T + self._w[f"{name}.bias"]

    def _attend(self, x: np.ndarray, pad_mask: np.ndarray, name: str) -> np.ndarray:
        """AttentionPool: the weighted sum of x by _attention's weights."""
        return np.matmul(self._attention(x, pad_mask, name)[:, None, :], x)[:, 0]

    def _attention(self, x: np.ndarray, pad_mask: np.ndarray, name: str) -> np.ndarray:
        """AttentionPool.weights: softmax over the non-padded positions of w·tanh(W x + b)."""
        logits = (np.tanh(self._linear(x, f"{name}.proj")) @ self._w[f"{name}.score.weight"].T)
        logits = np.where(pad_mask, np.float32(-np.inf), logits[..., 0])
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        return weights / weights.sum(-1, keepdims=True)

    def _gru(self, words: np.ndarray, lengths: np.ndarray):
        """-> (outputs [2, B, T, H], zero past each length; final states [2, B, H])."""
        b, t, _ = words.shape
        hid = self.hidden
        gi = (words.reshape(b * t, -1) @ self._w_ih + self._b_ih).reshape(b, t, 2, 3 * hid)
        h = np.zeros((2, b, hid), dtype=np.float32)
        out = np.zeros((2, b, t, hid), dtype=np.float32)
        for s in range(t):
            back = t - 1 - s
            x = np.stack([gi[:, s, 0], gi[:, back, 1]])          # [2, B, 3H]
            gh = np.matmul(h, self._w_hh) + self._b_hh            # [2, B, 3H]
            r = _sigmoid(x[..., :hid] + gh[..., :hid])
            z = _sigmoid(x[..., hid: 2 * hid] + gh[..., hid: 2 * hid])
            n = np.tanh(x[..., 2 * hid:] + r * gh[..., 2 * hid:])
            new = n + z * (h - n)                                 # (1 - z) n + z h
            live = np.stack([s < lengths, back < lengths])[..., None]
            h = np.where(live, new, h)
            out[0, :, s] = np.where(live[0], new[0], 0)
            out[1, :, back] = np.where(live[1], new[1], 0)
        return out, h

    def _forward(self, ids: Sequence[Sequence[int]], extra: np.ndarray | None, query: bool):
        lengths = np.array([len(s) for s in ids], dtype=np.int64)
        t = int(lengths.max())
        tokens = np.zeros((len(ids), t), dtype=np.int64)
        for i, s in enumerate(ids):
            tokens[i, : len(s)] = s
        n_words = len(self.word_vectors)
        words = self.word_vectors[np.where(tokens < n_words, tokens, 0)]
        if extra is not None:  # ids past the vocabulary address rows of `extra`
            outside = tokens >= n_words
            words[outside] = extra[tokens[outside] - n_words]
        out, last = self._gru(words, lengths)
        local, pooled = (out[0] + out[1]) / 2, (last[0] + last[1]) / 2
        pad_mask = np.arange(t)[None] >= lengths[:, None]

        residual = _sigmoid(self._linear(self._attend(local, pad_mask, "head.attn_mu"),
                                         "head.fc_attn"))
        pre = self._linear(pooled, "head.fc") + residual
        c = None
        if self.cfg.class_words:  # the class-word term: W · (attention-pooled word vectors)
            attention = self._attention(words, pad_mask, "word_attn")
            c = np.matmul(attention[:, None, :], words)[:, 0]
            pre = pre + self._linear(c, "class_map")
        mean = pre.mean(-1, keepdims=True)
        var = ((pre - mean) ** 2).mean(-1, keepdims=True)
        mu = ((pre - mean) / np.sqrt(var + np.float32(LAYER_NORM_EPS))
              * self._w["head.norm.weight"] + self._w["head.norm.bias"])
        mu = _unit(mu)
        log_var = self._linear(self._attend(local, pad_mask, "head.attn_var") + pooled,
                               "head.fc_var")
        if self.cfg.class_channel > 0:  # ClassChannel: [√(1−βs) μ, √(βs) c/‖c‖]; log σ² + log s
            scale = self.cfg.class_channel_scale
            share = self.cfg.class_channel * scale
            if query and extra is not None and self.cfg.open_word_log_var:  # never-trained words
                opened = (attention * (tokens >= n_words)).sum(-1)
                log_var = log_var + np.float32(self.cfg.open_word_log_var) * opened[:, None]
            if self.cfg.class_channel_space == "classes":  # √softmax(cos(c, g_k) / τ)
                cos = _unit(c) @ self._class_units
                c = _sqrt_softmax(cos / np.float32(self.cfg.class_channel_word_temp))
            mu = np.concatenate([mu * (1 - share) ** 0.5, _unit(c) * share ** 0.5], axis=-1)
            channel_log_var = self._w["channel.log_var"] + np.float32(np.log(scale))
            log_var = np.concatenate([log_var, np.broadcast_to(channel_log_var, c.shape)],
                                     axis=-1)
        return mu, log_var

    def forward(self, ids: Sequence[Sequence[int]], extra: np.ndarray | None = None,
                query: bool = False):
        """ids: token id lists (with <start>/<end>, at least one id each); ids >= len(vocab)
        address rows of `extra` [E, word_dim] (OpenVocab); `query`: the texts are queries (the
        class channel's open-word uncertainty, as TextEncoder.forward) -> (μ, log σ²), float32
        [len(ids), cfg.out_dim] each."""
        n_words, dim = self.word_vectors.shape
        rows = 0
        if extra is not None:
            extra = np.asarray(extra, dtype=np.float32)
            if extra.ndim != 2 or extra.shape[1] != dim:
                raise PcmeError(f"text tower: extra word vectors {extra.shape} are not "
                                f"[rows, {dim}]")
            rows = len(extra)
        for s in ids:
            if len(s) == 0:
                raise PcmeError("text tower: an empty token sequence (even an empty text has "
                                "<start> and <end>)")
            if min(s) < 0 or max(s) >= n_words + rows:
                raise PcmeError(f"text tower: token id {max(s) if min(s) >= 0 else min(s)} is "
                                f"outside the vocabulary ({n_words} words) and its {rows} "
                                f"extra rows")
        if not ids:
            empty = np.zeros((0, self.cfg.out_dim), dtype=np.float32)
            return empty, empty.copy()
        parts = [self._forward(ids[i: i + BATCH], extra, query) for i in range(0, len(ids), BATCH)]
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
