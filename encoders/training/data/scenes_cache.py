"""Scenes splits on disk: generate them once, read them back fast.

Layout of one split (`root/scenes/<split>/`):

    images/000000.png ...   the 64x64 renders
    captions.jsonl          one line per image: image path, key, setting, objects, captions
                            (text, level, predicate)
    manifest.json           generator version, seed, n_images, n_captions, created

A split is written into a temporary sibling folder and renamed into place only when complete,
so an interrupted generation never leaves a half cache; the manifest is written last. A cache
whose version, seed or size differs from what is asked is regenerated.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from encoders.training.data.base import Split
from encoders.training.data.captions import Caption, Predicate, make_captions, match_matrix
from encoders.training.data.scenes import Scene, SceneObject, image_rng, render_scene, sample_scene
from core.atomic import AtomicDir, utc_now
from core.errors import PcmeError

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump whenever scenes, sprites, captions or predicates change output
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}
DEFAULT_SIZES = {"train": 10_000, "val": 500, "test": 1_000}


@dataclass(eq=False)
class ScenesSplit(Split):
    scenes: list[Scene] = field(default_factory=list)            # per image: exact contents
    predicates: list[Predicate] = field(default_factory=list)    # per caption: its meaning
    caption_levels: list[str] = field(default_factory=list)      # per caption: see captions.py

    def match_block(self, captions: np.ndarray, images: np.ndarray) -> np.ndarray:
        return match_matrix([self.predicates[int(c)] for c in captions],
                            [self.scenes[int(i)] for i in images])


def generate_item(seed: int, index: int) -> tuple[Scene, Image.Image, list[Caption]]:
    """Image `index` of the split with this seed; the pair (seed, index) decides everything."""
    rng = image_rng(seed, index)
    scene = sample_scene(rng)
    image = render_scene(scene, rng)
    return scene, image, make_captions(scene, rng)


def load_scenes(root: Path, split: str, n_images: int | None = None) -> ScenesSplit:
    """The split, generated under `root/scenes/<split>` first if missing or stale."""
    if split not in SPLIT_SEEDS:
        raise PcmeError(f"scenes: unknown split {split!r}; known: {', '.join(SPLIT_SEEDS)}")
    n = DEFAULT_SIZES[split] if n_images is None else int(n_images)
    if n < 1:
        raise PcmeError(f"scenes: n_images must be at least 1, got {n}")
    folder = Path(root) / "scenes" / split
    wanted = {"generator_version": GENERATOR_VERSION, "seed": SPLIT_SEEDS[split], "n_images": n}
    if not _is_fresh(folder, wanted):
        build_cache(folder, split, SPLIT_SEEDS[split], n)
    out = read_cache(folder, split)
    if out.n_images != n:
        raise PcmeError(f"{folder / 'captions.jsonl'}: {out.n_images} images, manifest says {n}; "
                        f"delete {folder} to regenerate")
    return out


def _is_fresh(folder: Path, wanted: dict) -> bool:
    path = folder / "manifest.json"
    if not path.exists():
        return False
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        logger.warning("%s: unreadable (%s); regenerating the split", path, e)
        return False
    stale = {k: manifest.get(k) for k, v in wanted.items() if manifest.get(k) != v}
    if stale:
        logger.info("%s: stale (%s, want %s); regenerating", folder, stale, wanted)
    return not stale


def build_cache(folder: Path, split: str, seed: int, n: int) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    with AtomicDir(folder, kind="scenes") as tmp:  # Ctrl-C included: never half a folder
        _write_split(tmp, split, seed, n)


def _write_split(out: Path, split: str, seed: int, n: int) -> None:
    logger.info("generating scenes/%s: %d images (seed %d) into %s", split, n, seed, out)
    (out / "images").mkdir()
    start, n_captions = time.perf_counter(), 0
    with open(out / "captions.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            scene, image, captions = generate_item(seed, i)
            rel = f"images/{i:06d}.png"
            _write_image(image, out / rel)
            f.write(json.dumps(_record(split, i, rel, scene, captions)) + "\n")
            n_captions += len(captions)
            if (i + 1) % 2000 == 0:
                logger.info("scenes/%s: %d/%d images", split, i + 1, n)
    manifest = {"kind": "scenes", "dataset": "scenes", "split": split, "generator_version": GENERATOR_VERSION,
                "seed": seed, "n_images": n, "n_captions": n_captions,
                "created": utc_now()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("scenes/%s: %d images in %.1f s", split, n, time.perf_counter() - start)


def _write_image(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG")


def _record(split: str, i: int, rel: str, scene: Scene, captions: list[Caption]) -> dict:
    return {
        "image": rel, "key": f"scenes/{split}/{i:06d}", "setting": scene.setting,
        "objects": [{"category": o.category, "colour": o.colour, "x": o.x, "y": o.y,
                     "size": o.size} for o in scene.objects],
        "captions": [{"text": c.text, "level": c.level, "predicate": c.predicate.to_dict()}
                     for c in captions],
    }


def read_cache(folder: Path, split: str) -> ScenesSplit:
    """Reads captions.jsonl only; images stay on disk until load_image."""
    path = folder / "captions.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise PcmeError(f"{path}: cannot read the scenes cache ({e})") from e
    fields = {k: [] for k in ("image_paths", "image_keys", "scenes", "captions", "predicates",
                              "caption_levels", "caption_image")}
    for lineno, line in enumerate(lines, 1):
        try:
            _add_record(fields, json.loads(line))
        except (ValueError, KeyError, TypeError) as e:
            raise PcmeError(f"{path}:{lineno}: bad scenes record ({e})") from e
    return ScenesSplit(dataset="scenes", name=split, root=folder, **fields)


def _add_record(fields: dict, rec: dict) -> None:
    i = len(fields["image_paths"])
    fields["image_paths"].append(rec["image"])
    fields["image_keys"].append(rec["key"])
    objects = tuple(SceneObject(o["category"], o["colour"], o["x"], o["y"], o["size"])
                    for o in rec["objects"])
    fields["scenes"].append(Scene(rec["setting"], objects))
    for c in rec["captions"]:
        fields["captions"].append(c["text"])
        fields["predicates"].append(Predicate.from_dict(c["predicate"]))
        fields["caption_levels"].append(c["level"])
        fields["caption_image"].append(i)
