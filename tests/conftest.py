"""Shared fixtures: one tiny trained model + index per test session (the README quick start
on a tiny configuration), used by the CLI end-to-end and robustness tests."""
import os

import pytest
from typer.testing import CliRunner

# The test process trains, indexes and searches in one process, and the servers it starts inherit
# its environment: it waits passively, as a searching process must (core/process.py). Set here,
# the in-process `train` of the fixture below cannot switch it to the training policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from cli import app  # noqa: E402  (after the setting above, before torch or faiss load)
from tests.helpers import write_shards

TINY_TOML = ("batch_size = 32\nn_samples = 3\n[model]\nembed_dim = 16\nresnet_width = 8\n"
             "gru_hidden = 32\nattn_hidden = 8\n")


@pytest.fixture(autouse=True)
def _unfreeze_heap():
    """The service freezes the heap once loaded (core/process.py: settle_heap); every test
    shares this process, so what one test froze becomes collectable again after it."""
    yield
    import gc
    gc.unfreeze()


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A folder with data/ (scenes), run/checkpoint.pt, out/ (shards) and index/. Tests must
    not modify it: copy what they want to damage."""
    root = tmp_path_factory.mktemp("trained")
    cfg = root / "tiny.toml"
    cfg.write_text(TINY_TOML)
    runner = CliRunner()
    args = ["train", "--config", str(cfg), "--root", str(root / "data"), "--out", str(root / "run"),
            "--shards", str(root / "out"), "--train-images", "128", "--epochs", "1", "--device", "cpu"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["index", "--shards", str(root / "out"), "--out", str(root / "index")])
    assert res.exit_code == 0, res.output
    return root


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A small synthetic shard set (300 images, 300 captions, D = 8) and the index built from it:
    the 'last good output' that every bad-input case must leave intact. Tests must not modify it."""
    root = tmp_path_factory.mktemp("bad")
    write_shards(root / "out", 300)
    res = CliRunner().invoke(app, ["index", "--shards", str(root / "out"), "--out", str(root / "index")])
    assert res.exit_code == 0, res.output
    return root
