"""`encode --images DIR --captions FILE`: any folder, broken files skipped and listed."""
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from encoders.model.checkpoint import load_model
from encoders.model.encode import image_to_tensor
from encoders.model.images import load_image
from encoders.training.encode_files import read_caption_file
from core.errors import PcmeError


def _photo_folder(trained, root):
    src = sorted((trained / "data" / "scenes" / "test" / "images").glob("*.png"))[:6]
    (root / "a" / "b").mkdir(parents=True)
    for i, p in enumerate(src):
        shutil.copy(p, root / ("a/b" if i % 2 else "a") / f"photo{i}.png")
    Image.open(src[0]).convert("CMYK").save(root / "print.jpg")  # decodable quirk: kept
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    data = src[1].read_bytes()
    (root / "a" / "cut.png").write_bytes(data[: len(data) // 3])
    (root / "readme.txt").write_text("not an image suffix: ignored")
    return root


def test_encode_images_and_captions_skips_broken_files(trained, tmp_path):
    photos = _photo_folder(trained, tmp_path / "photos")
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"caption": "a red circle", "image": "a/photo0.png"}) + "\n\n" +
                    json.dumps({"text": "two blue squares"}) + "\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["encode", "--checkpoint", str(trained / "run" / "checkpoint.pt"),
                                   "--images", str(photos), "--captions", str(caps), "--out",
                                   str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "encoded 7 images and 2 captions, 2 unreadable files skipped" in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"image": 7, "text": 2}
    skipped = manifest["producer"]["skipped"]
    assert skipped["count"] == 2
    assert sorted(f["path"].rsplit("/", 1)[1] for f in skipped["files"]) == ["corrupt.jpg", "cut.png"]
    table = pq.read_table(out / "shard-00000.parquet").to_pydict()
    items = table["item"]
    images = [i for i, m in zip(items, table["modality"]) if m == "image"]
    assert images == sorted(images) and all(i.startswith(str(photos.resolve())) for i in images)
    groups = dict(zip(items, table["group"]))
    assert groups["a red circle"] == images.index(str((photos / "a" / "photo0.png").resolve()))
    assert groups["two blue squares"] == -1
    # each vector is what the model gives for that file, decoded by the shared loader
    model, _, _ = load_model(trained / "run" / "checkpoint.pt", torch.device("cpu"))
    k = images.index(str((photos / "print.jpg").resolve()))
    x = image_to_tensor(load_image(photos / "print.jpg"), model.cfg.image_size)[None]
    with torch.no_grad():
        mu, _ = model.image(x)
    assert np.allclose(table["mu"][k], mu[0].numpy(), atol=1e-5)
    res = CliRunner().invoke(app, ["index", "--shards", str(out), "--out", str(tmp_path / "index")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["query", "a red circle", "--index", str(tmp_path / "index"),
                                   "--k", "3", "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.output[res.output.index("{"):])["results"]) == 3


def test_encode_files_bad_input(trained, tmp_path):
    ckpt = str(trained / "run" / "checkpoint.pt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text('{"caption": "ok"}\n{"nope": 1}\n')
    for args, message in ((["--images", str(tmp_path / "missing")], "folder not found"),
                          (["--images", str(tmp_path / "empty")], "no image files"),
                          (["--captions", str(tmp_path / "bad.jsonl")], "bad.jsonl:2")):
        res = CliRunner().invoke(app, ["encode", "--checkpoint", ckpt, *args, "--out",
                                       str(tmp_path / "out"), "--device", "cpu"])
        assert res.exit_code == 2 and message in res.output, res.output
        assert not (tmp_path / "out").exists()  # nothing half-written
    (tmp_path / "plain.txt").write_text("a dog\n\n  a cat  \n")
    assert read_caption_file(tmp_path / "plain.txt") == [("a dog", None), ("a cat", None)]
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(PcmeError, match="no captions"):
        read_caption_file(tmp_path / "blank.txt")
