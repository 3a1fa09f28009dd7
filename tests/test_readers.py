"""Karpathy-format readers (COCO, Flickr30k) on tiny fixture files written here in the
datasets' own formats; CUB and folder readers are in test_readers_cub_folder.py."""
import json

import numpy as np
import pytest
import torch

from encoders.training.data import load_split
from encoders.training.data.coco import hamming
from core.errors import PcmeError
from tests.helpers import write_image


def _karpathy_entry(filename, split, n_captions=5, filepath=None, cocoid=None):
    entry = {"filename": filename, "split": split,
             "sentences": [{"raw": f" {filename} caption {j} ", "tokens": [filename, str(j)]}
                           for j in range(n_captions)]}
    if filepath is not None:
        entry.update(filepath=filepath, cocoid=cocoid)
    return entry


# ------------------------------------------------------------------------------------ COCO

COCO_LAYOUT = [  # (split, folder, cocoid, categories)
    ("train", "train2014", 1, [1]), ("restval", "val2014", 2, [1, 3]), ("val", "val2014", 3, []),
    ("test", "val2014", 4, [1]), ("test", "val2014", 5, [1, 2]), ("test", "val2014", 6, [2]),
    ("train", "train2014", 7, [3]),
]


def _instances(path, images):
    anns = [{"id": 100 * i + c, "image_id": i, "category_id": c}
            for i, cats in images for c in cats for _ in range(2)]  # 2 instances: counts ≠ labels
    data = {"images": [{"id": i} for i, _ in images], "annotations": anns,
            "categories": [{"id": c, "name": f"cat{c}"} for c in (3, 1, 2)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture
def coco_root(tmp_path):
    entries = []
    for split, folder, cocoid, _ in COCO_LAYOUT:
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        write_image(tmp_path / folder / name)
        entries.append(_karpathy_entry(name, split, 7 if cocoid == 4 else 5, folder, cocoid))
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    for folder in ("train2014", "val2014"):
        _instances(tmp_path / "annotations" / f"instances_{folder}.json",
                   [(c, cats) for _, f, c, cats in COCO_LAYOUT if f == folder])
    return tmp_path


def test_coco_splits_restval_in_train_and_five_captions(coco_root):
    train = load_split("coco", coco_root, "train")
    assert train.image_keys == ["coco/1", "coco/2", "coco/7"]
    assert train.image_paths[1] == "val2014/COCO_val2014_000000000002.jpg"
    test = load_split("coco", coco_root, "test")
    assert test.image_keys == ["coco/4", "coco/5", "coco/6"]
    assert test.n_captions == 15  # image 4 has 7 sentences; the protocol keeps 5
    assert test.captions[0] == "COCO_val2014_000000000004.jpg caption 0"
    assert list(test.caption_image) == [0] * 5 + [1] * 5 + [2] * 5
    assert test.match_matrix() is None
    assert test.load_image(2).size == (8, 6)
    assert load_split("coco", coco_root, "test", n_images=2).image_keys == ["coco/4", "coco/5"]


def test_coco_multi_hot_and_plausible_matrix_against_brute_force(coco_root):
    test = load_split("coco", coco_root, "test")
    # columns follow sorted category ids (1, 2, 3); repeated instances count once
    assert test.multi_hot_images.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 0]]
    assert np.array_equal(test.multi_hot_captions, test.multi_hot_images[test.caption_image])
    labels = test.multi_hot_images.astype(int)
    for zeta in (0, 1, 2):
        brute = np.array([[sum(x != y for x, y in zip(labels[test.caption_image[c]], labels[i]))
                           <= zeta for i in range(3)] for c in range(test.n_captions)])
        assert np.array_equal(test.plausible_matrix(zeta), brute)
    assert test.plausible_matrix(0)[0].tolist() == [True, False, False]
    assert test.plausible_matrix(1)[0].tolist() == [True, True, False]
    train = load_split("coco", coco_root, "train")  # needs both instances files
    assert train.multi_hot_images.tolist() == [[1, 0, 0], [1, 0, 1], [0, 0, 1]]


def test_hamming_by_hand():
    a = np.array([[1, 0, 1, 1]])
    b = np.array([[1, 0, 1, 1], [0, 1, 0, 0], [1, 1, 1, 1]])
    assert hamming(a, b).tolist() == [[0, 4, 1]]


def test_coco_without_instances_has_no_multi_hot(coco_root):
    (coco_root / "annotations" / "instances_val2014.json").unlink()
    test = load_split("coco", coco_root, "test")
    assert test.multi_hot_images is None
    with pytest.raises(PcmeError, match="annotations"):
        test.plausible_matrix(0)


@pytest.mark.slow
def test_coco_1k_folds_are_consecutive_blocks_of_the_5k_test(tmp_path):
    entries = [_karpathy_entry(f"{i}.jpg", "test", 1, "val2014", i) for i in range(5000)]
    entries.insert(10, _karpathy_entry("x.jpg", "val", 1, "val2014", 99999))
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    (tmp_path / "val2014").mkdir()
    for i in range(5000):  # existence is checked; pixels are decoded lazily
        (tmp_path / "val2014" / f"{i}.jpg").touch()
    assert load_split("coco", tmp_path, "test").n_images == 5000
    for k in range(5):
        fold = load_split("coco", tmp_path, f"test1k-{k}")
        assert fold.image_keys == [f"coco/{i}" for i in range(1000 * k, 1000 * (k + 1))]
    with pytest.raises(PcmeError, match="unknown split"):
        load_split("coco", tmp_path, "test1k-5")


def test_coco_errors_name_the_file(coco_root):
    (coco_root / "val2014" / "COCO_val2014_000000000005.jpg").unlink()
    with pytest.raises(PcmeError, match=r"dataset_coco.json: 1 of 3 captioned images are "
                                        r"missing, first .*000000000005.jpg"):
        load_split("coco", coco_root, "test")
    (coco_root / "dataset_coco.json").write_text('{"images": [\n{"filename": }')
    with pytest.raises(PcmeError, match=r"dataset_coco.json:2: malformed JSON"):
        load_split("coco", coco_root, "test")
    (coco_root / "dataset_coco.json").unlink()
    with pytest.raises(PcmeError, match="dataset_coco.json: file not found"):
        load_split("coco", coco_root, "test")


@pytest.mark.slow
def test_coco_test1k_is_the_mean_of_the_five_folds(tmp_path, monkeypatch):
    import encoders.training.data.coco as coco
    from encoders.model.checkpoint import save_checkpoint
    from encoders.model.config import ModelConfig
    from encoders.model.networks import PCME
    from encoders.training.pipeline import evaluate_checkpoint

    monkeypatch.setattr(coco, "FOLD_SIZE", 4)  # 4 images x 3 captions: enough for 10 σ bins
    entries = [_karpathy_entry(f"{i}.jpg", "test", 3, "val2014", i) for i in range(20)]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    for i in range(20):
        write_image(tmp_path / "val2014" / f"{i}.jpg", colour=(12 * i, 255 - 11 * i, 90))
    words = sorted({w for e in entries for s in e["sentences"] for w in s["raw"].split()})
    cfg = ModelConfig(vocab=["<pad>", "<start>", "<end>", "<unk>", *words], embed_dim=8,
                      resnet_width=4, gru_hidden=8, attn_hidden=4, image_size=16)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ck.pt", PCME(cfg))
    args = (str(tmp_path / "ck.pt"), "coco", str(tmp_path))
    folds = [evaluate_checkpoint(*args, f"test1k-{k}", ("mu", "elk"), "cpu") for k in range(5)]
    mean = evaluate_checkpoint(*args, "test1k", ("mu", "elk"), "cpu")
    assert mean["split"] == "test1k" and mean["folds"] == [f"test1k-{k}" for k in range(5)]
    for score in ("mu", "elk"):
        for d in ("t2i", "i2t"):
            for metric in ("R@1", "R@5", "mAP@R"):
                by_hand = sum(f["by_score"][score][d][metric] for f in folds) / 5
                assert mean["by_score"][score][d][metric] == pytest.approx(by_hand)
    assert mean["n_images"] == 4


# ------------------------------------------------------------------------------------ Flickr30k

@pytest.mark.parametrize("image_dir", ["flickr30k-images", "images"])
def test_flickr30k_splits_and_both_image_folders(tmp_path, image_dir):
    layout = [("1000.jpg", "train"), ("1001.jpg", "test"), ("1002.jpg", "val"),
              ("1003.jpg", "test")]
    for name, _ in layout:
        write_image(tmp_path / image_dir / name)
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(
        {"images": [_karpathy_entry(n, s) for n, s in layout], "dataset": "flickr30k"}))
    test = load_split("flickr30k", tmp_path, "test")
    assert test.image_keys == ["flickr30k/1001", "flickr30k/1003"]
    assert test.image_paths == [f"{image_dir}/1001.jpg", f"{image_dir}/1003.jpg"]
    assert test.n_captions == 10 and test.captions[5] == "1003.jpg caption 0"
    assert test.load_image(1).mode == "RGB"
    assert load_split("flickr30k", tmp_path, "train").n_images == 1
    assert load_split("flickr30k", tmp_path, "test", n_images=1).image_keys == ["flickr30k/1001"]


def test_flickr30k_errors(tmp_path):
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": [
        {"filename": "a.jpg", "split": "test", "sentences": [{"raw": "a dog"}]}]}))
    with pytest.raises(PcmeError, match="no Flickr30k image folder"):
        load_split("flickr30k", tmp_path, "test")
    (tmp_path / "images").mkdir()
    with pytest.raises(PcmeError, match=r"dataset_flickr30k.json: 1 of 1 captioned images"):
        load_split("flickr30k", tmp_path, "test")
    with pytest.raises(PcmeError, match="no images with split val"):
        load_split("flickr30k", tmp_path, "val")
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"pictures": []}))
    with pytest.raises(PcmeError, match="not a Karpathy split file"):
        load_split("flickr30k", tmp_path, "test")
