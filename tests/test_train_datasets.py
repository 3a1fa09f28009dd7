"""The training harness on a real-format reader (a folder of images + captions.jsonl)."""
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app

TINY = ("batch_size = 8\nn_samples = 2\n[model]\nembed_dim = 16\nresnet_width = 8\n"
        "gru_hidden = 16\nattn_hidden = 8\n")


@pytest.mark.parametrize("loss,extra,scores", [
    ("infonce", "", {"mu"}), ("pcmepp", "", {"mu", "elk"}),
    ("pcme", 'eval_scores = ["mu", "csd", "w2"]\n', {"mu", "csd", "w2"})])
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
