"""A real-photo development set from Debian's tuxpaint-stamps-default (GPL-2): cut-out photos
with a one-line English description ("A koala.", "A sitting gnu.") beside each PNG.

    apt-get install -y tuxpaint-stamps-default          # this script installs nothing
    python benchmarks/tuxpaint_photos.py --out data/tuxpaint
    python cli.py train --data folder --root data/tuxpaint --config benchmarks/configs/photos_lite0_frozen.toml

Writes `images/<folder>__<name>.png` and `captions.jsonl` ({"image", "caption", "split"}), the
layout of the folder reader. Kept: every stamp PNG with a .txt whose first line is its English
description; left out: folders of drawings (`cartoon`) and of symbols (letters, sign language,
coins), which are not photographs. Split: a hash of the image name, TEST_PERCENT held out as
"test" (more test images than the reader's 80/10/10 default gives: ~470 stamps are few).
`--validation` writes the TRAIN photos only, split again by a second hash (VALIDATION_SALT):
a set on which a setting can be chosen without the test photos, whose "test" split is the
validation photos.
The output is data, never committed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

STAMPS = Path("/usr/share/tuxpaint/stamps")
APT = "apt-get install -y tuxpaint-stamps-default"
LEFT_OUT = ("cartoon", "symbols")  # folder names that hold drawings or symbols, not photos
TEST_PERCENT = 25
VALIDATION_SALT = "validation:"   # --validation: the second split hashes this + the image name


def description(txt: Path) -> str:
    """First line of the stamp's .txt: its English description."""
    with open(txt, encoding="utf-8", errors="replace") as f:
        return f.readline().strip()


def split_of(name: str) -> str:
    bucket = int(hashlib.sha1(name.encode("utf-8")).hexdigest(), 16) % 100
    return "test" if bucket < TEST_PERCENT else "train"


def validation_split_of(name: str) -> str | None:
    """--validation: None for a test photo (left out), else "test" (validation) or "train"."""
    return split_of(VALIDATION_SALT + name) if split_of(name) == "train" else None


def stamps(root: Path) -> list[tuple[Path, str]]:
    found = []
    for png in sorted(root.rglob("*.png")):
        rel = png.relative_to(root)
        if any(part in LEFT_OUT for part in rel.parts[:-1]):
            continue
        txt = png.with_suffix(".txt")
        if txt.is_file() and description(txt):
            found.append((png, description(txt)))
    return found


def build(root: Path, out: Path, validation: bool = False) -> dict:
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "test": 0}
    with open(out / "captions.jsonl", "w", encoding="utf-8") as f:
        for png, caption in stamps(root):
            name = "__".join(png.relative_to(root).with_suffix("").parts) + ".png"
            split = validation_split_of(name) if validation else split_of(name)
            if split is None:
                continue
            shutil.copyfile(png, out / "images" / name)
            counts[split] += 1
            f.write(json.dumps({"image": name, "caption": caption, "split": split}) + "\n")
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stamps", type=Path, default=STAMPS, help="tuxpaint stamps folder")
    ap.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    ap.add_argument("--validation", action="store_true",
                    help="the train photos only, split again: choose settings without the test")
    args = ap.parse_args(argv)
    if not args.stamps.is_dir():
        print(f"error: {args.stamps}: not found; install the stamps first: {APT}", file=sys.stderr)
        return 2
    counts = build(args.stamps, args.out, args.validation)
    if not sum(counts.values()):
        print(f"error: {args.stamps}: no stamp PNG with a description", file=sys.stderr)
        return 2
    print(f"{args.out}: {counts['train']} train + {counts['test']} "
          f"{'validation' if args.validation else 'test'} photos with captions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
