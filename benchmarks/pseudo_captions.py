"""An experiment on the real-photo set (README, "Real photographs"): a copy of a folder dataset
whose TRAIN photos also carry captions naming what EfficientNet-Lite0's ImageNet classifier
sees in them ("A water ouzel." beside "A blackbird."); test photos and captions are unchanged.
The question: does text that names the classifier's classes teach the text tower to ground
words no human caption has? (Measured: a little, at a cost in R@1; not part of any default.)

    python benchmarks/pseudo_captions.py --root data/tuxpaint --out data/tuxpaint_pc \
        [--hypernym] [--image-size 224]

Each train photo gains "A <top-1 class name>." and, with --hypernym, "A <its class's first
WordNet hypernym>." (encoders/model/imagenet_wordnet.json). The images folder is linked, not
copied. Evaluate a model trained on the copy with `photos_eval.py --root <the original>`, so
the held-out words are still those of the human captions.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from core.process import configure_process
from encoders.model.class_words import WORDNET_TABLE
from encoders.model.config import ModelConfig
from encoders.model.encode import image_to_tensor
from encoders.model.networks import ImageEncoder
from encoders.training.data import load_split


def class_captions(root: Path, image_size: int, hypernym: bool) -> dict[str, list[str]]:
    """{image path under root/images: the captions naming its top-1 ImageNet class}."""
    classes = json.loads(WORDNET_TABLE.read_text())["classes"]
    train = load_split("folder", root, "train")
    cfg = ModelConfig(backbone="efficientnet-lite0", image_size=image_size, class_words=True)
    enc = ImageEncoder(cfg, class_map=torch.nn.Identity()).eval()
    out = {}
    with torch.inference_mode():
        for i in range(train.n_images):
            pooled = enc.features(image_to_tensor(train.load_image(i), image_size)[None])
            top = classes[int(enc.backbone._fc(pooled.mean(dim=(2, 3))).argmax())]
            caps = [f"A {top['name']}."]
            if hypernym and top["hypernyms"]:
                caps.append(f"A {top['hypernyms'][0][0]}.")
            out[os.path.relpath(train.image_paths[i], "images")] = caps
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True, help="a folder dataset (captions.jsonl)")
    ap.add_argument("--out", type=Path, required=True, help="where the copy goes (must not exist)")
    ap.add_argument("--image-size", type=int, default=224, help="classifier input size")
    ap.add_argument("--hypernym", action="store_true", help="also name the class's hypernym")
    args = ap.parse_args(argv)
    configure_process()
    if args.out.exists():
        print(f"{args.out}: exists; give a new folder", file=sys.stderr)
        return 1
    extra = class_captions(args.root, args.image_size, args.hypernym)
    args.out.mkdir(parents=True)
    os.symlink((args.root / "images").resolve(), args.out / "images")
    with open(args.root / "captions.jsonl", encoding="utf-8") as f, \
            open(args.out / "captions.jsonl", "w", encoding="utf-8") as g:
        named = 0
        for line in f:
            obj = json.loads(line)
            if obj.get("split") == "train" and obj["image"] in extra:
                texts = obj["captions"] if "captions" in obj else [obj["caption"]]
                obj = {"image": obj["image"], "split": "train",
                       "captions": texts + extra.pop(obj["image"])}
                named += 1
            g.write(json.dumps(obj) + "\n")
    print(f"{args.out}: class captions for {named} train photos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
