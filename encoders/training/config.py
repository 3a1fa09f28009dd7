"""Training configuration as a dataclass: what `cli.py train` fills from these defaults, an
optional TOML/JSON file and flags. Each field's default lives here and nowhere else (the CLI
reads them for its --help); the model's own fields are encoders/model/config.py."""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from core.errors import PcmeError
from encoders.model.config import ModelConfig


@dataclass
class TrainConfig:
    data: str = "scenes"            # dataset name (scenes, ...)
    root: str = "data"              # dataset root folder (scenes cache is generated there)
    out: str = "runs/latest"        # run folder: checkpoint.pt, log.jsonl, eval.json
    shards: str = "out"             # where the test split's shards are written after training
    epochs: int = 10                # passes over the training images (the default fits in 5 min)
    batch_size: int = 128           # images per step
    captions_per_image: int = 5     # captions per image in a step (all 5 of a scene/COCO image):
                                    # the costly image forward pass learns from every caption
    lr: float = 2e-3                # AdamW learning rate (peak of the cosine schedule)
    weight_decay: float = 1e-4      # AdamW weight decay
    warmup_steps: int = 50          # linear warm-up before the cosine decay
    grad_clip: float = 2.0          # max global gradient norm
    accum_steps: int = 1            # micro-batches per optimiser step (negatives stay in-batch)
    freeze_backbone_epochs: int = 0 # stage 1: epochs with the image backbone frozen (pretrained
                                    # weights); >= epochs keeps it frozen for the whole run
    backbone_lr_scale: float = 1.0  # stage 2: backbone learning rate = lr * this (e.g. 0.1)
    match_lr_scale: float = 50.0    # learning rate of a and b (p = sigmoid(-a d + b)) = lr * this:
                                    # they must move by tens within a short run (p_match calibration)
    ckpt_every: int = 50            # optimiser steps between resumable last.pt saves
    loss: str = "prob-nce"          # prob-nce (not in the papers; losses_nce.py) | pcme | pcmepp |
                                    # infonce | vse++
    pseudo_weight: float = 0.1      # pcmepp: weight of the pseudo-positive pairs
    margin: float = 0.2             # vse++: triplet margin
    temperature: float = 0.0        # infonce: fixed τ; 0 = learn it (1/τ is the model's a)
    nce_score: str = "csd"          # prob-nce (not in the papers): logits −scale·CSD, scale·ELK,
                                    # −scale·‖Δμ‖² (mu: σ learns only from the σ-only terms) or
                                    # csd_img (CSD without the caption's Σσ²)
    nce_scale: float = 7.5          # prob-nce: fixed logit scale (7.5·CSD = 15·cos + const)
    nce_temper: float = 0.0         # prob-nce (not in the papers): β of each anchor's σ-set softmax
                                    # temperature exp(−β(log Σσ² − batch mean)); 0 = off
    hit_temper: float = 1.0         # prob-nce (not in the papers): β of a σ-only term, the tempered
                                    # softmax mass on any positive of DETACHED logits; 0 = off
    hit_captions: bool = False      # hit_temper on caption anchors too (images always); default off:
                                    # it makes caption σ rise with the number of true matches
    failure_weight: float = 1.0     # prob-nce (not in the papers): weight of a σ-only term fitting
                                    # "in-batch top-1 is wrong" from log Σσ² (failure_loss); 0 = off
    failure_images: bool = False    # failure term on image anchors too (captions always); default
                                    # off: an image's σ also ranks it for every text query
    plausible_weight: float = 1.0   # prob-nce (not in the papers): weight of a plausible positive
                                    # in the ranking CE relative to the own pair's 1 (1 = equal)
    pcme_weight: float = 0.0        # prob-nce: weight of PCME's likelihood; 0 = train only a, b
                                    # on it (embeddings detached), so p_match stays calibrated
    n_samples: int = 7              # J: samples per item in the loss
    calib_samples: int = 2          # prob-nce with pcme_weight 0: J of the a, b calibration (only
                                    # two scalars learn; 2x2 sample pairs cost 1/12 of 7x7)
    kl_weight: float = 1e-4         # weight of KL(N(μ,σ²) ‖ N(0,I))
    uniformity_weight: float = 0.0  # weight of the uniformity loss on samples (0 = off)
    balanced_pairs: bool = True     # pcme, pcmepp: mean(pos) + mean(neg); false = mean over all
                                    # pairs (every pair weighs the same, as the papers' code does)
    anchor_positives: bool = False  # pcme: average each anchor's positives first (balanced only)
    hard_negatives: bool = False    # pcme, not in the paper: weight each anchor's negatives by
    hard_negative_beta: float = 1.0 # p(match)^beta instead of equally (see losses.hard_negative_nll)
    positives: str = "auto"         # in-batch positives: "auto" = plausible where the dataset
                                    # knows, else pairs; "pairs" = the captions written for the
                                    # image; "plausible" = every caption true of it (datasets that
                                    # know: scenes predicates, CUB classes)
    train_images: int = 10000       # size of the scenes training split
    glove: str = ""                 # GloVe text file; empty = offline GloVe 6B 50-d package
    min_word_count: int = 1         # words seen fewer times in training captions map to <unk>
    word_dropout: float = 0.0       # not in the paper: each caption word is left out of a training
                                    # step with this probability (one always stays), so the text
                                    # tower also sees bare and partial phrases like a user's query
    seed: int = 0                   # seeds data order, noise and initialisation
    device: str = "auto"            # auto | cpu | cuda
    amp: bool = True                # autocast: on CUDA bf16 when supported, else fp16; on a CPU bf16
                                    # where it is native (AVX512-BF16/AMX), else float32
    eval_split: str = "test"        # split evaluated and exported at the end
    eval_scores: list[str] = field(default_factory=list)  # scores evaluated at the end; empty =
                                    # mu, elk (probabilistic losses) or mu (μ-only baselines)
    export: bool = True             # write the eval split's shards after training
    model: ModelConfig = field(default_factory=ModelConfig)


# Lower bounds checked when a config is built: a 0 batch size or a negative epoch count would
# otherwise fail deep inside training with a traceback instead of naming the key.
MINIMUM = {"epochs": 0, "batch_size": 1, "captions_per_image": 1, "accum_steps": 1, "ckpt_every": 1,
           "n_samples": 1, "calib_samples": 1, "train_images": 1, "warmup_steps": 0, "freeze_backbone_epochs": 0,
           "min_word_count": 1, "nce_temper": 0, "hit_temper": 0, "failure_weight": 0, "plausible_weight": 0, "class_map_gain": 0, "embed_dim": 2, "resnet_width": 1, "image_size": 8, "word_dim": 1,
           "gru_hidden": 1, "attn_hidden": 1}


FRACTIONS = ("word_dropout",)   # probabilities: [0, 1)


def _check_and_build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise PcmeError(f"{where}: expected a table of options, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise PcmeError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    out = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if name == "model":
            if not isinstance(value, dict):
                raise PcmeError(f"{where}: 'model' must be a table ([model]), got {value!r}")
            out[name] = _check_and_build(ModelConfig, value, f"{where} [model]")
            continue
        if isinstance(default, bool) and not isinstance(value, bool):
            raise PcmeError(f"{where}: '{name}' must be true or false, got {value!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PcmeError(f"{where}: '{name}' must be a number, got {value!r}")
            if isinstance(default, int) and not float(value).is_integer():
                raise PcmeError(f"{where}: '{name}' must be a whole number, got {value!r}")
            value = type(default)(value)
        if isinstance(default, str) and not isinstance(value, str):
            raise PcmeError(f"{where}: '{name}' must be a string, got {value!r}")
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
                raise PcmeError(f"{where}: '{name}' must be a list of positive whole numbers, "
                                f"got {value!r}")
            value = tuple(value)
        if isinstance(default, list) and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise PcmeError(f"{where}: '{name}' must be a list of strings")
        if name in MINIMUM and value < MINIMUM[name]:
            raise PcmeError(f"{where}: '{name}' must be >= {MINIMUM[name]}, got {value!r}")
        if name in FRACTIONS and not 0.0 <= value < 1.0:
            raise PcmeError(f"{where}: '{name}' must be in [0, 1), got {value!r}")
        out[name] = value
    return cls(**out)


LITE0_CLASS_CHANNEL = 0.5   # class_channel of a Lite0 run with class words that does not set it:
                            # the first value tried (an equal share); README "Real photographs"


def load_train_config(path: str | Path | None, overrides: dict) -> TrainConfig:
    """Defaults, then the TOML/JSON file, then CLI overrides (None values are ignored; a "model"
    dict of overrides is merged into the file's [model] table)."""
    values: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise PcmeError(f"--config {path}: file not found")
        try:
            text = path.read_text(encoding="utf-8")
            values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise PcmeError(f"--config {path}: cannot parse ({e})") from None
        if not isinstance(values, dict):
            raise PcmeError(f"--config {path}: expected a table/object at the top level")
    overrides = dict(overrides)
    model = {k: v for k, v in (overrides.pop("model", None) or {}).items() if v is not None}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if model:
        if not isinstance(values.get("model", {}), dict):
            raise PcmeError(f"{path or 'config'}: 'model' must be a table ([model])")
        values["model"] = {**values.get("model", {}), **model}
    model_values = values.get("model", {})
    if isinstance(model_values, dict) and model_values.get("backbone") == "efficientnet-lite0":
        # a Lite0 run reads its ImageNet classifier's class words, with a class channel, unless
        # told not to (README, "Real photographs"); ModelConfig's own defaults stay off, so a
        # checkpoint's saved config, and every older one, means what it meant
        model_values = {"class_words": True, **model_values}
        if model_values["class_words"]:
            model_values = {"class_channel": LITE0_CLASS_CHANNEL, **model_values}
        values["model"] = model_values
    cfg = _check_and_build(TrainConfig, values, str(path or "config"))
    _check_choices(cfg, str(path or "config"))
    return cfg


POSITIVES = ("auto", "pairs", "plausible")


def _check_choices(cfg: TrainConfig, where: str) -> None:
    """Names that would otherwise fail only after the dataset is generated and decoded."""
    from encoders.training.data import LOADERS  # lazy: the readers and losses pull in torch
    from core.scores import SCORES

    from encoders.training.losses_baselines import LOSSES
    from encoders.model.class_terms import CHANNEL_SPACES
    from encoders.model.networks import BACKBONES
    from encoders.model.class_words import SOURCES

    for obj, name, choices in ((cfg, "loss", LOSSES), (cfg, "data", LOADERS),
                               (cfg, "positives", POSITIVES), (cfg.model, "backbone", BACKBONES),
                               (cfg.model, "class_word_source", SOURCES),
                               (cfg.model, "class_channel_space", CHANNEL_SPACES)):
        if getattr(obj, name) not in choices:
            raise PcmeError(f"{where}: {name} {getattr(obj, name)!r} is unknown; choose one of "
                            f"{', '.join(choices)}")
    unknown = [s for s in cfg.eval_scores if s not in SCORES]
    if unknown:
        raise PcmeError(f"{where}: eval_scores {unknown} unknown; choose from {', '.join(SCORES)}")
    if cfg.model.class_words and cfg.model.backbone != "efficientnet-lite0":
        raise PcmeError(f"{where}: class_words needs backbone efficientnet-lite0 (its ImageNet "
                        f"classifier), not {cfg.model.backbone!r}")
    if not 0 <= cfg.model.class_channel < 1:
        raise PcmeError(f"{where}: class_channel {cfg.model.class_channel} must lie in [0, 1)")
    if cfg.model.class_channel and not cfg.model.class_words:
        raise PcmeError(f"{where}: class_channel needs class_words")
    for name in ("class_channel_word_temp", "class_channel_image_temp"):
        if not getattr(cfg.model, name) > 0:
            raise PcmeError(f"{where}: {name} {getattr(cfg.model, name)} must be > 0")
