"""CUB-200-2011 (text_c10, class split) and folder (captions.jsonl / .csv) readers on tiny
fixture files written here in their own formats, and the reader registry."""
import json

import numpy as np
import pytest

from encoders.training.data import LOADERS, load_split
from core.errors import PcmeError
from tests.helpers import write_cub, write_image


# ------------------------------------------------------------------------------------ CUB

def test_cub_class_files_give_the_zero_shot_split_and_class_ground_truth(tmp_path):
    write_cub(tmp_path, class_files={"trainvalclasses.txt": ["001.Bird_1", "003.Bird_3"],
                                "testclasses.txt": ["004.Bird_4", "002.Bird_2"]})
    test = load_split("cub", tmp_path, "test")
    assert test.image_keys == ["cub/002.Bird_2/Bird_2_0", "cub/002.Bird_2/Bird_2_1",
                               "cub/004.Bird_4/Bird_4_0", "cub/004.Bird_4/Bird_4_1"]
    assert test.n_captions == 40 and test.captions[10] == "bird 2 image 1 caption 0"
    assert test.image_class.tolist() == [2, 2, 4, 4]
    cls = test.image_class
    brute = np.array([[cls[test.caption_image[c]] == cls[i] for i in range(4)]
                      for c in range(40)])
    assert np.array_equal(test.match_matrix(), brute)
    assert test.match_matrix()[0].tolist() == [True, True, False, False]
    assert test.load_image(3).size == (8, 6)
    train = load_split("cub", tmp_path, "train")
    assert set(train.image_class.tolist()) == {1, 3}
    assert load_split("cub", tmp_path, "all", n_images=3).n_images == 3


def test_cub_fallback_split_is_first_150_classes_by_id(tmp_path, monkeypatch):
    import encoders.training.data.cub as cub
    monkeypatch.setattr(cub, "N_TRAIN_CLASSES", 3)  # 150 of 200, scaled down to 3 of 4
    write_cub(tmp_path, per_class=1)
    assert load_split("cub", tmp_path, "train").image_class.tolist() == [1, 2, 3]
    assert load_split("cub", tmp_path, "test").image_class.tolist() == [4]


def test_cub_errors(tmp_path):
    with pytest.raises(PcmeError, match="text_c10"):
        load_split("cub", tmp_path, "train")
    write_cub(tmp_path, per_class=1, class_files={"trainvalclasses.txt": ["001.Bird_1", "009.Nope"],
                                             "testclasses.txt": ["002.Bird_2"]})
    with pytest.raises(PcmeError, match=r"trainvalclasses.txt: 1 classes have no folder"):
        load_split("cub", tmp_path, "train")
    (tmp_path / "CUB_200_2011/images/002.Bird_2/Bird_2_0.jpg").unlink()
    with pytest.raises(PcmeError, match=r"text_c10: 1 of 1 captioned images are missing"):
        load_split("cub", tmp_path, "test")


# ------------------------------------------------------------------------------------ folder

def _folder(root, names=("a.jpg", "sub/b.png", "c.jpg")):
    for n in names:
        write_image(root / "images" / n)


def test_folder_jsonl_groups_captions_and_resolves_paths(tmp_path):
    _folder(tmp_path)
    lines = [{"image": "a.jpg", "caption": "a red square"},
             {"image": "sub/b.png", "captions": ["one", "two"]},
             {"image": "images/c.jpg", "caption": "third"},
             {"image": "a.jpg", "caption": "again a"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    split = load_split("folder", tmp_path, "all")
    assert split.image_paths == ["images/a.jpg", "images/sub/b.png", "images/c.jpg"]
    assert split.captions == ["a red square", "again a", "one", "two", "third"]
    assert list(split.caption_image) == [0, 0, 1, 1, 2]
    assert split.load_image(1).size == (8, 6)
    assert load_split("folder", tmp_path, "all", n_images=2).n_images == 2


def test_folder_csv_and_split_field(tmp_path):
    _folder(tmp_path)
    (tmp_path / "captions.csv").write_text(
        'image,caption,split\na.jpg,"a cat, sitting",train\nsub/b.png,a dog,test\n'
        'c.jpg,a bird,test\n')
    assert load_split("folder", tmp_path, "train").captions == ["a cat, sitting"]
    assert load_split("folder", tmp_path, "test").image_paths == ["images/sub/b.png",
                                                                  "images/c.jpg"]
    with pytest.raises(PcmeError, match="no images in split 'val'"):
        load_split("folder", tmp_path, "val")


def test_folder_hash_split_is_deterministic_and_partitions_all(tmp_path):
    import hashlib
    names = [f"img{i}.jpg" for i in range(60)]
    (tmp_path / "images").mkdir()
    for n in names:
        (tmp_path / "images" / n).touch()
    (tmp_path / "captions.jsonl").write_text(
        "".join(json.dumps({"image": n, "caption": f"c {n}"}) + "\n" for n in names))
    parts = {s: load_split("folder", tmp_path, s).image_keys for s in ("train", "val", "test")}
    assert sorted(k for keys in parts.values() for k in keys) == sorted(f"folder/{n}"
                                                                      for n in names)
    for split, keys in parts.items():
        for key in keys:
            bucket = int(hashlib.sha1(key[len("folder/"):].encode()).hexdigest(), 16) % 100
            assert split == ("train" if bucket < 80 else "val" if bucket < 90 else "test")


def test_folder_errors_name_file_and_line(tmp_path):
    with pytest.raises(PcmeError, match="images folder not found"):
        load_split("folder", tmp_path, "all")
    _folder(tmp_path)
    with pytest.raises(PcmeError, match="no captions.jsonl or captions.csv"):
        load_split("folder", tmp_path, "all")
    path = tmp_path / "captions.jsonl"
    path.write_text('{"image": "a.jpg", "caption": "ok"}\n{"image": "c.jpg", "caption": \n')
    with pytest.raises(PcmeError, match=r"captions.jsonl:2: malformed JSON"):
        load_split("folder", tmp_path, "all")
    path.write_text('{"image": "a.jpg", "caption": "ok"}\n{"image": "c.jpg"}\n')
    with pytest.raises(PcmeError, match=r"captions.jsonl:2: expected a non-empty"):
        load_split("folder", tmp_path, "all")
    path.write_text("".join(json.dumps({"image": n, "caption": "x"}) + "\n"
                            for n in ("a.jpg", "gone1.jpg", "gone2.jpg")))
    with pytest.raises(PcmeError, match=r"captions.jsonl: 2 of 3 captioned images are missing, "
                                        r"first .*gone1.jpg"):
        load_split("folder", tmp_path, "all")
    path.unlink()
    (tmp_path / "captions.csv").write_text("image,caption\na.jpg,fine\nc.jpg,too,many\n")
    with pytest.raises(PcmeError, match=r"captions.csv:3: wrong number of fields"):
        load_split("folder", tmp_path, "all")
    (tmp_path / "captions.csv").write_text("picture,text\na.jpg,fine\n")
    with pytest.raises(PcmeError, match=r"captions.csv:1: header"):
        load_split("folder", tmp_path, "all")


def test_registry_and_unknown_split(tmp_path):
    assert {"scenes", "coco", "flickr30k", "cub", "folder"} <= set(LOADERS)
    for dataset in ("coco", "flickr30k", "cub", "folder"):
        with pytest.raises(PcmeError, match="unknown split"):
            load_split(dataset, tmp_path, "nope")
