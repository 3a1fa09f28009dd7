"""Zero-shot sweeps of the untrained class signal on the real-photo dev set
(benchmarks/tuxpaint_photos.py), counted on the TRAIN split (every GloVe-known subject of a train
caption against the train photos: the split a setting may be chosen on) and on the held-out
split (its 67 unseen subjects).

--space words: each photo's mixture Σ_k p_k·g_k (encoders/model/class_words.py) with
p = softmax(logits / T), or the softmax of only the top n logits, ranked against each subject
word's GloVe vector by cosine, as `photos_eval.py --zero-shot --class-channel-space words` does
at T = 1.
--space classes: the class channel in class space (encoders/model/class_terms.py: ClassChannel),
the Bhattacharyya coefficient of the photo's softmax(logits / T) and the word's
softmax(cos(word, g_k) / τ), over a grid of τ (class_channel_word_temp) and T
(class_channel_image_temp); ModelConfig's defaults are the grid's best on the TRAIN split.

    python benchmarks/class_mixture_sweep.py --root data/tuxpaint [--image-size 128]
        [--space words|classes]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.photos_eval import (classifier_logits, held_out_words, subject, top5_word_hits,
                                    zero_shot_scores)
from core.process import configure_process
from encoders.model.class_words import imagenet_class_words
from encoders.model.config import ModelConfig
from encoders.model.networks import ImageEncoder
from encoders.model.open_vocab import GloveTable
from encoders.training.data import load_split

TEMPERATURES = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0)
TOPS = (1, 3, 5, 10, 20)
WORD_TEMPS = (0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.08)   # τ, --space classes
IMAGE_TEMPS = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0)           # T, --space classes


def top5_hits(probs: torch.Tensor, table: torch.Tensor, split, words: list[str],
              glove: GloveTable) -> int:
    """Words with a photo whose caption has the word among the 5 nearest mixtures."""
    mix = (probs @ table).numpy()
    mix /= np.linalg.norm(mix, axis=1, keepdims=True)
    vectors = glove.vectors(words)
    scores = np.stack(list(vectors.values())) @ mix.T
    return len(top5_word_hits(scores, list(vectors), split))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--space", choices=("words", "classes"), default="words")
    args = ap.parse_args(argv)
    configure_process("bench")
    test, train = load_split("folder", args.root, "test"), load_split("folder", args.root, "train")
    cfg = ModelConfig(backbone="efficientnet-lite0", image_size=args.image_size, class_words=True)
    enc = ImageEncoder(cfg, class_map=torch.nn.Identity()).eval()
    table = torch.from_numpy(imagenet_class_words("wordnet"))
    glove = GloveTable()
    splits = {"train": (train, sorted({subject(c) for c in train.captions} - {""})),
              "held_out": (test, held_out_words(train, test, True))}
    logits = {name: classifier_logits(enc, split, args.image_size)
              for name, (split, _) in splits.items()}
    if args.space == "classes":
        return class_space_grid(cfg, splits, logits, table.numpy(), glove)
    rows = []
    settings = [("T", t) for t in TEMPERATURES] + [("top", n) for n in TOPS]
    for kind, value in settings:
        row = {kind: value}
        for name, (split, words) in splits.items():
            lg = logits[name]
            if kind == "T":
                probs = torch.softmax(lg / value, -1)
            else:
                top, at = lg.topk(value, -1)
                probs = torch.zeros_like(lg).scatter_(-1, at, torch.softmax(top, -1))
            row[name] = top5_hits(probs, table, split, words, glove)
            row[name + "_n"] = len(glove.vectors(words))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return 0


def class_space_grid(cfg: ModelConfig, splits: dict, logits: dict, table, glove) -> int:
    """Every (τ, T) of the grid: top-5 hits on both splits; the best on TRAIN last."""
    best = None
    for tau in WORD_TEMPS:
        for temp in IMAGE_TEMPS:
            c = replace(cfg, class_channel=0.5, class_channel_word_temp=tau,
                        class_channel_image_temp=temp)
            row = {"word_temp": tau, "image_temp": temp}
            for name, (split, words) in splits.items():
                vectors = glove.vectors(words)
                row[name] = len(top5_word_hits(zero_shot_scores(c, logits[name], vectors, table),
                                               list(vectors), split))
                row[name + "_n"] = len(vectors)
            print(json.dumps(row), flush=True)
            if best is None or row["train"] > best["train"]:
                best = row
    print(json.dumps({"best_on_train": best}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
