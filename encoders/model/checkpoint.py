"""Checkpoints that rebuild their model alone, and the one place a device is chosen.

A checkpoint is a plain dict of tensors and primitives (loads with weights_only=True):
{"model_config": asdict(ModelConfig), "model": state_dict, "train_config": dict,
 "epoch": completed epochs, "step": optimizer steps, "optimizer": ..., "scheduler": ...}.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch

from core.errors import PcmeError
from core.atomic import atomic_write

from encoders.model.checkpoint_reader import check_recorded_sha256, missing_hint

from encoders.model.config import model_config_from_dict
from encoders.model.networks import PCME, TOWERS
from encoders.model.text import Vocab

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise PcmeError(f"--device {name}: expected auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PcmeError(f"--device {name}: no CUDA device is available on this machine")
    return torch.device(name)


def save_checkpoint(path: str | Path, model: PCME, **extra) -> None:
    """Atomic: written beside the target, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model_config": asdict(model.cfg), "model": model.state_dict(), **extra}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """`mmap`: tensors stay in the mapped file until used; a model load copies what it needs,
    so the optimizer state a training checkpoint also holds is never read (half of a one-shot
    query's load time)."""
    path = Path(path)
    if not path.is_file():
        raise PcmeError(f"checkpoint {path}: {missing_hint(path)}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated, foreign or pickled-object files all end here
        raise PcmeError(f"checkpoint {path}: cannot be read ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
        raise PcmeError(f"checkpoint {path}: not a pcme-search checkpoint")
    return ckpt


def load_model(path: str | Path, device: torch.device, expected_sha256: str | None = None,
               towers: tuple[str, ...] = TOWERS):
    """-> (model in eval mode on device, vocabulary, checkpoint dict). `towers` limits what is
    built and loaded (PCME); the checkpoint must still hold every tower's weights."""
    check_recorded_sha256(path, expected_sha256)
    ckpt = read_checkpoint(path, mmap=True)
    cfg = model_config_from_dict(ckpt["model_config"])
    # the checkpoint already holds the backbone weights: no weight file or package is read
    cfg.resnet_weights, cfg.imagenet_weights = "", False
    model = PCME(cfg, towers)
    skipped = tuple(f"{t}." for t in TOWERS if t not in towers)
    model.load_state_dict({k: v for k, v in ckpt["model"].items() if not k.startswith(skipped)}
                          if skipped else ckpt["model"])
    model.to(device).eval()
    return model, Vocab(cfg.vocab), ckpt
