"""The README quick start, through the CLI, on a tiny configuration."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def query_json(root, *args):
    res = runner.invoke(app, ["query", *args, "--index", str(root / "index"), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_train_wrote_checkpoint_eval_and_shards(trained):
    assert (trained / "run" / "checkpoint.pt").is_file()
    report = json.loads((trained / "run" / "eval.json").read_text())
    assert report["n_images"] == 1000 and report["n_captions"] == 5000
    assert set(report["by_score"]) >= {"mu", "elk"}
    assert json.loads((trained / "out" / "manifest.json").read_text())["counts"] == {"image": 1000, "text": 5000}


def test_text_query_json_shape_and_order(trained):
    out = query_json(trained, "people waiting for a train", "--k", "7")
    assert out["modality"] == "image" and out["score"] == "elk"
    assert [h["rank"] for h in out["results"]] == list(range(1, 8))
    scores = [h["score"] for h in out["results"]]
    assert scores == sorted(scores, reverse=True)
    assert all(h["uncertainty"] > 0 and h["item"].endswith(".png") for h in out["results"])
    assert len({h["id"] for h in out["results"]}) == 7
    assert out["query_uncertainty"] > 0 and "ann_ms" in out["timings_ms"]


def test_mu_score_equals_exhaustive_inner_product(trained):
    from indexer.reader import IndexReader
    from cli import open_engine

    with open_engine(trained / "index") as eng:
        mu, lv, _ = eng.encoder.encode_text("a red car next to a dog")
    with IndexReader.open(trained / "index") as reader:
        ids, mus, _ = reader.all_vectors("image")
    expected = ids[np.argsort(-(mus @ mu), kind="stable")[:5]]
    out = query_json(trained, "a red car next to a dog", "--score", "mu", "--k", "5")
    assert [h["id"] for h in out["results"]] == list(expected)


def test_unknown_words_are_reported(trained):
    out = query_json(trained, "people waiting for a zeppelinx")
    assert out["unknown_words"] == ["zeppelinx"]
    # words GloVe knows are not unknown (open vocabulary); words nobody knows are rejected
    res = runner.invoke(app, ["query", "qqqzzzxxw zzqqxxwv", "--index", str(trained / "index")])
    assert res.exit_code == 2 and "vocabulary or GloVe" in res.output


def test_image_query_returns_captions(trained):
    img = trained / "data" / "scenes" / "test" / "images" / "000002.png"
    out = query_json(trained, "--image", str(img), "--k", "3", "--score", "mc")
    assert out["modality"] == "text" and len(out["results"]) == 3
    again = query_json(trained, "--image", str(img), "--k", "3", "--score", "mc")
    assert out["results"] == again["results"]  # fixed per-item Monte-Carlo noise


@pytest.mark.slow
def test_eval_json(trained, tmp_path):
    png = tmp_path / "unc.png"
    res = runner.invoke(app, ["eval", "--checkpoint", str(trained / "run" / "checkpoint.pt"),
                              "--root", str(trained / "data"), "--json", "--device", "cpu",
                              "--scores", "mu,elk", "--plot", str(png)])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout[res.stdout.index("{"):])
    stored = json.loads((trained / "run" / "eval.json").read_text())
    assert report["by_score"]["elk"]["t2i"]["R@1"] == pytest.approx(stored["by_score"]["elk"]["t2i"]["R@1"])
    unc = report["uncertainty"]
    assert len(unc["bins"]) == 10 and sum(b["n"] for b in unc["bins"]) == 5000
    assert -1 <= unc["spearman_caption_var_vs_matches"] <= 1
    levels = {g["group"]: g for g in unc["by_group"]}  # scenes captions come in levels
    assert sum(g["n"] for g in levels.values()) == 5000
    assert levels["setting"]["mean_matches"] > levels["pair"]["mean_matches"]
    from PIL import Image
    assert Image.open(png).size == (720, 400)


def test_index_with_augmented_scores_and_recall_target(trained, tmp_path):
    out = tmp_path / "aug_index"
    res = runner.invoke(app, ["index", "--shards", str(trained / "out"), "--out", str(out),
                              "--augmented", "csd,w2", "--recall-target", "0.99"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recall_target"] == 0.99
    assert manifest["augmented"] == {"image": ["csd", "w2"], "text": ["csd", "w2"]}
    for score in ("csd", "w2"):
        args = ["query", "a street scene", "--index", str(out), "--json", "--k", "5", "--score", score]
        fast = json.loads(runner.invoke(app, args).stdout)
        exact = json.loads(runner.invoke(app, args + ["--exact"]).stdout)
        assert [h["id"] for h in fast["results"]] == [h["id"] for h in exact["results"]]
    bad = runner.invoke(app, ["index", "--shards", str(trained / "out"), "--out", str(out),
                              "--augmented", "elk"])
    assert bad.exit_code == 2 and "augmented index for ['elk']" in bad.output


def test_query_encoder_reads_text_in_numpy_and_builds_the_image_tower_on_demand(trained):
    """Text queries go through the numpy text tower, without torch's model, and give what the
    torch model gives through the same open vocabulary (a word outside the training captions
    included); the first image query builds the image tower alone, equal to the full model."""
    import torch

    from encoders.model.checkpoint import load_model
    from encoders.model.encode import encode_images, encode_texts
    from encoders.model.open_vocab import OpenVocab
    from encoders.model.query import QueryEncoder

    ckpt = trained / "run" / "checkpoint.pt"
    enc = QueryEncoder.from_checkpoint(ckpt)
    assert enc.image_model is None
    full, vocab, _ = load_model(ckpt, torch.device("cpu"))
    texts = ["a dog next to a car", "a giraffe left of a bus"]   # giraffe: not a training word
    got = enc.encode_texts(texts)
    assert got[1][2] == [] and "giraffe" not in vocab.index
    mu, lv = encode_texts(full, OpenVocab.for_model(full, vocab), texts, torch.device("cpu"))
    np.testing.assert_allclose(np.stack([g[0] for g in got]), mu, atol=1e-5)
    np.testing.assert_allclose(np.stack([g[1] for g in got]), lv, atol=1e-5)
    image = trained / "data" / "scenes" / "test" / "images" / "000002.png"
    got = enc.encode_image(image)
    assert enc.image_model is not None and enc.image_model.text is None
    from PIL import Image
    want = encode_images(full, lambda i: Image.open(image), 1, torch.device("cpu"))
    np.testing.assert_allclose(got[0], want[0][0], atol=1e-6)
    np.testing.assert_allclose(got[1], want[1][0], atol=1e-6)
