"""In-batch positives for training: the written pairing, or every caption true of an image."""
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from encoders.training.data import load_split
from encoders.training.data.predicates import holds
from encoders.training.train import Trainer, batch_positives
from core.errors import PcmeError
from tests.helpers import write_cub
from tests.test_train import tiny


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return load_split("scenes", tmp_path_factory.mktemp("scenes"), "train", n_images=40)


def _batch(split, images, per):
    return np.array([np.flatnonzero(split.caption_image == i)[:per] for i in images])


def test_pairs_are_the_captions_written_for_each_image(scenes):
    images = np.array([7, 3, 12])
    caps = _batch(scenes, images, 2)
    m = batch_positives(scenes, images, caps, "pairs").numpy()
    expected = np.zeros((3, 6), dtype=bool)
    for i in range(3):
        expected[i, 2 * i:2 * i + 2] = True
    assert np.array_equal(m, expected)


def test_plausible_positives_are_every_true_caption_checked_one_by_one(scenes):
    images = np.arange(0, 40, 3)
    caps = _batch(scenes, images, 5)
    m = batch_positives(scenes, images, caps, "plausible").numpy()
    flat = caps.ravel()
    brute = np.array([[holds(scenes.predicates[c], scenes.scenes[i]) for c in flat] for i in images])
    assert np.array_equal(m, brute)
    # a caption is true of the image it was written for, and generic ones of many more
    assert m[np.arange(len(images))[:, None], np.arange(len(flat)).reshape(len(images), 5)].all()
    assert m.sum() > len(flat)
    assert np.array_equal(scenes.match_block(flat, images), scenes.match_matrix()[flat][:, images])


def test_cub_plausible_positives_are_same_class(tmp_path):
    write_cub(tmp_path, n_classes=3, per_class=2)
    split = load_split("cub", tmp_path, "all")
    images = np.array([5, 0, 2])
    caps = _batch(split, images, 1)
    m = batch_positives(split, images, caps, "plausible").numpy()
    cls = split.image_class
    assert np.array_equal(m, cls[images][:, None] == cls[images][None, :])


def test_plausible_on_a_dataset_without_ground_truth_fails_before_training(tmp_path, monkeypatch):
    scenes = load_split("scenes", tmp_path / "data", "train", n_images=32)
    monkeypatch.setattr(type(scenes), "match_block", lambda self, c, i: None)
    with pytest.raises(PcmeError, match="positives 'plausible'.*use 'pairs'"):
        Trainer(tiny(tmp_path, positives="plausible", train_images=32))


@pytest.mark.slow
def test_training_with_plausible_positives(tmp_path, monkeypatch):
    """The loss of a `positives = "plausible"` run sees, in every batch, exactly the in-batch
    pairs whose caption is true of the image (checked caption by caption), not the pairing."""
    import encoders.training.train as train_mod
    batches, masks = [], []
    real_make_batch, real_loss = train_mod.make_batch, train_mod.compute_loss

    def make_batch(split, caption_ids, source, images, captions, *rest):
        batches.append((np.asarray(images).copy(), np.asarray(captions).copy()))
        return real_make_batch(split, caption_ids, source, images, captions, *rest)

    def compute_loss(cfg, i_mu, i_lv, t_mu, t_lv, matched, a, b):
        masks.append(matched.cpu().numpy().copy())
        out = real_loss(cfg, i_mu, i_lv, t_mu, t_lv, matched, a, b)
        assert torch.isfinite(out["loss"]) and 0 < float(out["pos_prob"]) < 1
        return out

    monkeypatch.setattr(train_mod, "make_batch", make_batch)
    monkeypatch.setattr(train_mod, "compute_loss", compute_loss)
    t = Trainer(tiny(tmp_path, positives="plausible", epochs=1, captions_per_image=2,
                     train_images=32))
    split = t.train_split
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.fit()
    assert len(masks) == len(batches) == t.steps_per_epoch
    for (images, caps), mask in zip(batches, masks):
        flat = caps.ravel()
        brute = np.array([[holds(split.predicates[c], split.scenes[i]) for c in flat] for i in images])
        assert mask.shape == (len(images), 2 * len(images)) and np.array_equal(mask, brute)
    # the data holds captions true of several images, so the test tells plausible from pairs
    assert sum(int(m.sum()) for m in masks) > sum(m.shape[1] for m in masks)
    assert any(not torch.equal(v, t.model.state_dict()[k]) for k, v in before.items())


def test_unknown_positives_is_a_one_line_error(tmp_path):
    res = CliRunner().invoke(app, ["train", "--positives", "all", "--root", str(tmp_path)])
    assert res.exit_code == 2
    assert "positives 'all' is unknown; choose one of auto, pairs, plausible" in res.output
