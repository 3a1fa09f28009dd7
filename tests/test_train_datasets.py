"""The training harness on a real-format reader (a folder of images + captions.jsonl)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from encoders.model.checkpoint import load_model
from encoders.training.config import load_train_config
from encoders.training.train import Trainer, make_batch

# warmup_steps: the run is 15 optimiser steps, so the default warm-up would keep lr near 0
TINY = ("batch_size = 8\nn_samples = 2\nwarmup_steps = 2\n[model]\nembed_dim = 16\n"
        "resnet_width = 8\ngru_hidden = 16\nattn_hidden = 8\n")


def mean_train_loss(trainer: Trainer, model) -> float:
    """The run's loss over the training split in fixed batches of 8 images (2 captions each),
    fixed sampling noise, no flips. BatchNorm uses batch statistics (train mode) so that only
    the parameters, not the running averages a forward pass updates, make the difference."""
    trainer.model = model.train()
    losses = []
    with torch.no_grad():
        for start in range(0, trainer.train_split.n_images - 7, 8):
            images = np.arange(start, start + 8)
            caps = np.array([trainer.caps_of[i][:2] for i in images])
            torch.manual_seed(0)
            batch = make_batch(trainer.train_split, trainer.caption_ids, trainer.images, images, caps,
                               np.random.default_rng(0))
            losses.append(float(trainer.forward_loss(*batch)["loss"]))
    return float(np.mean(losses))


@pytest.mark.parametrize("loss,extra,scores", [
    ("infonce", "", {"mu"}), ("pcmepp", "", {"mu", "elk", "csd", "mc"}),
    ("pcme", 'eval_scores = ["mu", "csd", "w2"]\n', {"mu", "csd", "w2"})])
@pytest.mark.slow
def test_train_on_a_folder_dataset(tmp_path, loss, extra, scores):
    (tmp_path / "images").mkdir()
    colours = ["red", "green", "blue", "yellow"]
    rgb = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
    with open(tmp_path / "captions.jsonl", "w") as f:
        for i in range(120):
            c = colours[i % 4]
            Image.new("RGB", (32, 32), rgb[c]).save(tmp_path / "images" / f"{i}.png")
            f.write(json.dumps({"image": f"images/{i}.png", "captions": [f"a {c} square", f"{c}"]}) + "\n")
    (tmp_path / "tiny.toml").write_text(extra + TINY)
    res = CliRunner().invoke(app, ["train", "--data", "folder", "--root", str(tmp_path),
                                   "--config", str(tmp_path / "tiny.toml"), "--epochs", "1",
                                   "--loss", loss, "--out", str(tmp_path / "run"),
                                   "--shards", str(tmp_path / "out"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["dataset"] == "folder" and set(report["by_score"]) == scores
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["image"] == report["n_images"] > 0
    assert manifest["counts"]["text"] == 2 * report["n_images"]
    # the epoch trained the chosen loss: lower on the training data than at initialisation
    cfg = load_train_config(tmp_path / "tiny.toml", {"data": "folder", "root": str(tmp_path),
                                                     "loss": loss, "epochs": 1, "device": "cpu",
                                                     "out": str(tmp_path / "init")})
    init = Trainer(cfg)  # the seeded initial model of the same run
    trained, _, _ = load_model(tmp_path / "run" / "checkpoint.pt", torch.device("cpu"))
    before, after = mean_train_loss(init, init.model), mean_train_loss(init, trained)
    assert after < 0.95 * before, (before, after)
