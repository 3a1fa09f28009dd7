"""Zero-shot sweep of the class-word mixture's sharpness on the real-photo dev set
(benchmarks/tuxpaint_photos.py): each photo's mixture Σ_k p_k·g_k (encoders/model/class_words.py)
with p = softmax(logits / T), or the softmax of only the top n logits, ranked against each
subject word's GloVe vector by cosine, as `photos_eval.py --zero-shot` does at T = 1. Counted on
the TRAIN split (every GloVe-known subject of a train caption against the train photos: the
split a setting may be chosen on) and on the held-out split (its 67 unseen subjects).

    python benchmarks/class_mixture_sweep.py --root data/tuxpaint [--image-size 128]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.photos_eval import held_out_words, subject
from core.process import configure_process
from encoders.model.class_words import imagenet_class_words
from encoders.model.config import ModelConfig
from encoders.model.encode import image_to_tensor
from encoders.model.networks import ImageEncoder
from encoders.model.open_vocab import GloveTable
from encoders.model.text import tokenize
from encoders.training.data import load_split

TEMPERATURES = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0)
TOPS = (1, 3, 5, 10, 20)


def classifier_logits(enc: ImageEncoder, split, size: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([enc.backbone._fc(enc.features(image_to_tensor(split.load_image(i),
                                                                        size)[None])
                                           .mean(dim=(2, 3))).float()
                          for i in range(split.n_images)])


def top5_hits(probs: torch.Tensor, table: torch.Tensor, split, words: list[str],
              glove: GloveTable) -> int:
    """Words with a photo whose caption has the word among the 5 nearest mixtures."""
    caps: dict[int, set[str]] = {}
    for c, i in zip(split.captions, split.caption_image):
        caps.setdefault(i, set()).update(tokenize(c))
    mix = (probs @ table).numpy()
    mix /= np.linalg.norm(mix, axis=1, keepdims=True)
    vectors = glove.vectors(words)
    return sum(any(w in caps[i] for i in np.argsort(-(mix @ v))[:5]) for w, v in vectors.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--image-size", type=int, default=128)
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


if __name__ == "__main__":
    raise SystemExit(main())
