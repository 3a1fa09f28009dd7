"""Optimiser and learning-rate schedule: AdamW, linear warm-up, cosine decay, two stages.

Stage 1 (the first `freeze_backbone_epochs` epochs) trains everything but the image backbone
(ResNet or EfficientNet-Lite0), which stays frozen (learning rate 0, BatchNorm statistics fixed):
useful when the backbone starts from pretrained weights. Stage 2 trains end to end with the
backbone at `lr * backbone_lr_scale`. A backbone frozen for the whole run gets no gradients at
all (requires_grad off), which skips its backward pass: ~3x cheaper steps on a CPU.
"""
from __future__ import annotations

import math

import torch

from encoders.training.config import TrainConfig
from encoders.model.networks import PCME


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def backbone_frozen(cfg: TrainConfig, epoch: int) -> bool:
    return epoch < cfg.freeze_backbone_epochs


def make_optimizer(model: PCME, cfg: TrainConfig, steps_per_epoch: int):
    """AdamW with three parameter groups (backbone, the match scalars a and b, the rest) and a
    LambdaLR per group. a and b get lr * match_lr_scale and no weight decay: they are two
    scalars far from 0, and at lr 2e-3 Adam moves each by at most ~1 in a 600-step run."""
    backbone = list(model.image.backbone.parameters())
    frozen_for_good = cfg.freeze_backbone_epochs >= cfg.epochs
    for p in backbone:
        p.requires_grad_(not frozen_for_good)
    scalars = [model.a_raw, model.b]
    ids = {id(p) for p in backbone + scalars}
    rest = [p for p in model.parameters() if id(p) not in ids]
    opt = torch.optim.AdamW([{"params": backbone, "lr": cfg.lr * cfg.backbone_lr_scale},
                             {"params": scalars, "lr": cfg.lr * cfg.match_lr_scale,
                              "weight_decay": 0.0},
                             {"params": rest, "lr": cfg.lr}], weight_decay=cfg.weight_decay)
    total = steps_per_epoch * cfg.epochs
    frozen_steps = steps_per_epoch * cfg.freeze_backbone_epochs

    def backbone_lambda(step: int) -> float:
        if step < frozen_steps:
            return 0.0
        return lr_factor(step - frozen_steps, total - frozen_steps, cfg.warmup_steps)

    def rest_lambda(step: int) -> float:
        return lr_factor(step, total, cfg.warmup_steps)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, [backbone_lambda, rest_lambda, rest_lambda])
