"""Small file helpers shared by the real-format readers (COCO, Flickr30k, CUB, folder).

Every failure is a PcmeError that names the file, so a user with a half-downloaded dataset
learns which file to fix, never sees a traceback.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from core.errors import PcmeError

logger = logging.getLogger(__name__)


def read_json(path: Path) -> object:
    """The parsed JSON file; a malformed file names its line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise PcmeError(f"{path}: file not found") from e
    except json.JSONDecodeError as e:
        raise PcmeError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise PcmeError(f"{path}: cannot read ({e})") from e


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise PcmeError(f"{path}: {what} folder not found")
    return path


def check_images_exist(root: Path, rel_paths: list[str], listed_in: Path) -> None:
    """Fail once, with a count and the first culprit, if captions point to missing images.

    Checked up front (one stat per image) so a long training run never dies at step 10,000
    on a missing file; the pixels themselves are still decoded lazily by Split.load_image.
    """
    missing = [p for p in rel_paths if not (root / p).is_file()]
    if missing:
        raise PcmeError(f"{listed_in}: {len(missing)} of {len(rel_paths)} captioned images are "
                        f"missing, first {root / missing[0]}")


def cap_images(n_total: int, n_images: int | None, where: str) -> int:
    """How many images to keep: all of them, or the first `n_images` (for quick experiments)."""
    if n_images is None:
        return n_total
    if n_images < 1:
        raise PcmeError(f"{where}: n_images must be at least 1, got {n_images}")
    return min(n_total, int(n_images))
