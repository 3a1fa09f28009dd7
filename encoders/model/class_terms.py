"""How the ImageNet classifier's classes join the towers (torch; not in the papers): the class-word
map W shared by both towers (encoders/model/class_words.py builds its table) and the class
channel, an untrained zero-shot signal appended to μ. networks.py builds both towers with them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import PcmeError

from encoders.model.class_words import N_CLASSES
from encoders.model.config import ModelConfig


def class_word_map(cfg: ModelConfig) -> nn.Linear | None:
    """W of the class-word term, shared by both towers (None without class words)."""
    if not cfg.class_words:
        return None
    if cfg.backbone != "efficientnet-lite0":
        raise PcmeError(f"class_words needs the efficientnet-lite0 backbone (its ImageNet "
                        f"classifier); backbone is {cfg.backbone!r}")
    w = nn.Linear(cfg.word_dim, cfg.embed_dim)
    if cfg.class_map_gain > 0:
        # orthogonal columns: W·c starts as a scaled copy of the word-vector space, so a word
        # and a photo whose classifier names it start close together (see ModelConfig)
        nn.init.orthogonal_(w.weight, gain=cfg.class_map_gain)
        nn.init.zeros_(w.bias)
    return w


CHANNEL_SPACES = ("classes", "words")   # ModelConfig.class_channel_space choices


class ClassChannel(nn.Module):
    """The class channel (ModelConfig.class_channel = β): μ ← [√(1−βs)·μ, √(βs)·c/‖c‖] (still
    unit norm), log σ² ← [log σ², one learned value + log s for the appended dims], s being
    cfg.class_channel_scale (the channel weighs as word_dim dims however wide). c is untrained:
      "classes": the square root of a distribution over the ImageNet classes, the image's
                 softmax(classifier logits / T) or the caption's softmax(cos(pooled word
                 vector, g_k) / τ) over the class-word table g; the appended part's inner
                 product is the Bhattacharyya coefficient of the two distributions, how likely
                 photo and words are to name the same class;
      "words":   the class-word mixture (image) or the pooled word vectors (text), whose inner
                 product is the cosine of benchmarks/photos_eval.py --zero-shot.
    The text tower's channel keeps its own copy of g ("classes"): a text-only model has no
    image tower.
    A text QUERY whose words training never saw (the open vocabulary) gets log σ² + Λ·u on its
    learned dims, u being the share of its word attention on such words and Λ
    cfg.open_word_log_var: the learned dims know those words only through their word vectors,
    so the query leans on the untrained channel. Only queries: a caption stored in a collection
    keeps its σ, since an inflated σ would draw it near every image query (measured: image→text
    R@1 0.30 → 0.21 on the photo set). Training never has such words."""

    def __init__(self, cfg: ModelConfig, tower: str):
        super().__init__()
        if cfg.class_channel_space not in CHANNEL_SPACES:
            raise PcmeError(f"class_channel_space {cfg.class_channel_space!r} is unknown; choose "
                            f"one of {', '.join(CHANNEL_SPACES)}")
        self.space, self.scale = cfg.class_channel_space, cfg.class_channel_scale
        self.share = cfg.class_channel * self.scale   # of μ's unit norm
        self.word_temp, self.image_temp = cfg.class_channel_word_temp, cfg.class_channel_image_temp
        self.open_word_log_var = cfg.open_word_log_var
        self.log_var = nn.Parameter(torch.tensor(float(cfg.init_log_var)))
        if self.space == "classes" and tower == "text":
            self.register_buffer("class_words", torch.zeros(N_CLASSES, cfg.word_dim))

    def image_vector(self, logits: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        """c of a photo from its classifier logits [B, classes] and class-word mixture."""
        if self.space == "words":
            return mix
        return torch.exp(0.5 * F.log_softmax(logits.float() / self.image_temp, dim=-1))

    def text_vector(self, pooled_words: torch.Tensor) -> torch.Tensor:
        """c of a caption from its attention-pooled word vector [B, word_dim]."""
        if self.space == "words":
            return pooled_words
        cos = F.normalize(pooled_words.float(), dim=-1) @ F.normalize(self.class_words, dim=-1).T
        return torch.exp(0.5 * F.log_softmax(cos / self.word_temp, dim=-1))

    def forward(self, mu, log_var, c, open_share: torch.Tensor | None = None):
        """open_share: [B] the text's word-attention share on open-vocabulary words (or None)."""
        if open_share is not None and self.open_word_log_var:
            log_var = log_var + self.open_word_log_var * open_share[:, None].to(log_var)
        c = F.normalize(c.float(), dim=-1)
        mu = torch.cat([mu * (1 - self.share) ** 0.5, c * self.share ** 0.5], dim=-1)
        channel_log_var = self.log_var + math.log(self.scale)
        return mu, torch.cat([log_var, channel_log_var.expand(c.shape)], dim=-1)


def class_channel(cfg: ModelConfig, tower: str) -> ClassChannel | None:
    if cfg.class_channel <= 0:
        return None
    if not cfg.class_words:
        raise PcmeError("class_channel needs class_words")
    return ClassChannel(cfg, tower)
