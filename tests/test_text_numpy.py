"""The torch-free text path: the checkpoint reader equals torch.load, the numpy text tower equals
the torch TextEncoder, bad files are refused in one line, and a query process never imports
torch (encoders/model/checkpoint_reader.py, encoders/model/text_numpy.py)."""
import io
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import PcmeError
from encoders.model.checkpoint import save_checkpoint
from encoders.model.checkpoint_reader import read_checkpoint_numpy
from encoders.model.config import ModelConfig
from encoders.model.encode import pad_tokens
from encoders.model.networks import PCME
from encoders.model.text import MAX_TOKENS, SPECIALS
from encoders.model.text_numpy import NumpyTextTower

ROOT = Path(__file__).resolve().parents[1]
VOCAB = SPECIALS + [f"w{i}" for i in range(40)]
LITE0 = dict(backbone="efficientnet-lite0", imagenet_weights=False)
CONFIGS = {
    "plain": {},
    "class_words+channel": dict(LITE0, class_words=True, class_channel=0.25, open_word_log_var=3.0),
    "class_words+word-space channel": dict(LITE0, class_words=True, class_channel=0.25,
                                           class_channel_space="words"),
}


def text_model(seed=0, **kw) -> PCME:
    """A small text tower in eval mode whose every weight is random: the log σ² head starts
    near-constant (weights ~0.01), which would make its comparison vacuous."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab=VOCAB, embed_dim=16, word_dim=10, gru_hidden=12, attn_hidden=8, **kw)
    model = PCME(cfg, towers=("text",)).eval()
    with torch.no_grad():
        for p in model.text.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        model.text.head.fc_var.weight.mul_(10)
        channel = model.text.channel
        if channel is not None and channel.space == "classes":  # a buffer: random class words
            channel.class_words.copy_(torch.randn_like(channel.class_words))
    return model


def token_batch(rng, n_words, extra_rows=0):
    """Lengths 1 (one id), 2 (<start><end>), ... up to MAX_TOKENS, padded in different places;
    ids past the vocabulary address `extra` rows."""
    hi = n_words + extra_rows
    ids = [[int(rng.integers(1, hi))]]
    for n in (MAX_TOKENS - 2, 0, 5, 17, 1, 30):
        ids.append([1] + [int(i) for i in rng.integers(3, hi, n)] + [2])
    return ids


@pytest.mark.parametrize("extra_rows", [0, 3], ids=["vocab", "open-vocab"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_numpy_tower_equals_torch(tmp_path, name, extra_rows):
    model = text_model(**CONFIGS[name])
    save_checkpoint(tmp_path / "m.pt", model)
    tower = NumpyTextTower.from_checkpoint(tmp_path / "m.pt")
    assert tower.cfg == model.cfg and tower.vocab.words == VOCAB
    np.testing.assert_array_equal(tower.word_vectors, model.text.embed.weight.detach().numpy())

    rng = np.random.default_rng(1)
    ids = token_batch(rng, len(VOCAB), extra_rows)
    assert {len(s) for s in ids} >= {1, MAX_TOKENS}
    extra = rng.normal(size=(extra_rows, 10)).astype(np.float32) if extra_rows else None
    tokens, lengths = pad_tokens(ids)
    with torch.no_grad():
        mu, log_var = model.text(tokens, lengths,
                                 None if extra is None else torch.from_numpy(extra), query=True)
        item_lv = model.text(tokens, lengths,
                             None if extra is None else torch.from_numpy(extra))[1]
    np_mu, np_lv = tower.forward(ids, extra, query=True)
    # open words raise a query's learned log σ² (ClassChannel), never an item's
    assert (not torch.equal(item_lv, log_var)) == (extra is not None and model.text.channel is not None)
    np.testing.assert_allclose(tower.forward(ids, extra)[1], item_lv.numpy(), rtol=0, atol=1e-5)
    assert np_mu.dtype == np_lv.dtype == np.float32
    assert np_mu.shape == np_lv.shape == (len(ids), model.cfg.out_dim)
    assert log_var.std() > 0.5 and log_var[:, 0].std() > 0.1  # not a constant head
    np.testing.assert_allclose(np_mu, mu.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np_lv, log_var.numpy(), rtol=0, atol=1e-5)
    # one sequence alone gives what it gave in the batch (no leak between padded rows)
    one_mu, _ = tower.forward(ids[3:4], extra, query=True)
    np.testing.assert_allclose(one_mu[0], np_mu[3], rtol=0, atol=1e-6)


def test_tower_refuses_bad_input(tmp_path):
    model = text_model()
    tower = NumpyTextTower(model.cfg, {k[len("text."):]: v.numpy()
                                       for k, v in model.state_dict().items()
                                       if k.startswith("text.")})
    mu, lv = tower.forward([])
    assert mu.shape == lv.shape == (0, 16)
    for ids, needle in (([[1, len(VOCAB)]], "outside the vocabulary"), ([[]], "empty")):
        with pytest.raises(PcmeError, match=needle):
            tower.forward(ids)
    state = {k[len("text."):]: v.numpy() for k, v in model.state_dict().items()
             if k.startswith("text.")}
    del state["head.fc_var.bias"]
    with pytest.raises(PcmeError, match="text.head.fc_var.bias"):
        NumpyTextTower(model.cfg, state)
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(PcmeError, match="not a pcme-search checkpoint"):
        NumpyTextTower.from_checkpoint(tmp_path / "other.pt")


def assert_same(ours, theirs, where="checkpoint"):
    """`ours` (numpy) holds what `theirs` (torch.load) holds: same containers, keys, values,
    and each tensor's dtype, shape and values (bfloat16 as float32)."""
    if isinstance(theirs, torch.Tensor):
        theirs = theirs.detach()
        want = theirs.float().numpy() if theirs.dtype == torch.bfloat16 else theirs.numpy()
        assert isinstance(ours, np.ndarray), where
        assert (ours.dtype, ours.shape) == (want.dtype, want.shape), where
        np.testing.assert_array_equal(ours, want, err_msg=where)
    elif isinstance(theirs, dict):
        assert type(ours) is type(theirs) and list(ours) == list(theirs), where
        assert getattr(ours, "_metadata", None) == getattr(theirs, "_metadata", None), where
        for k in theirs:
            assert_same(ours[k], theirs[k], f"{where}[{k!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), where
        for k, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{k}]")
    else:
        assert type(ours) is type(theirs) and ours == theirs, where


def test_reader_equals_torch_load(tmp_path):
    model = text_model(**CONFIGS["class_words+channel"])
    opt = torch.optim.Adam(model.parameters())
    tokens, lengths = pad_tokens([[1, 5, 2], [1, 2]])
    model.text(tokens, lengths)[1].sum().backward()
    opt.step()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    path = tmp_path / "any name.ckpt"
    save_checkpoint(path, model, optimizer=opt.state_dict(), epoch=3, step=7,
                    train_config={"lr": 1e-3, "data": "coco", "layers": (1, 2), "tags": {"a"}},
                    rng=torch.get_rng_state(),
                    views={"base": base, "slice": base[1:, 2:], "t": base.t(),
                           "scalar": base[2, 3], "empty": base[:0]},
                    dtypes={"half": torch.randn(5).half(), "bf16": torch.randn(3).bfloat16(),
                            "double": torch.randn(2, dtype=torch.float64),
                            "int": torch.tensor([1, -2], dtype=torch.int32),
                            "mask": torch.tensor([True, False])},
                    param=torch.nn.Parameter(torch.ones(2)))
    theirs = torch.load(path, weights_only=True)
    ours = read_checkpoint_numpy(path)
    assert_same(ours, theirs)
    state = ours["optimizer"]["state"]
    assert state and all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in state.values())
    views = ours["views"]
    assert views["t"].strides == (4, 24) and not views["slice"].flags.c_contiguous
    # views of the mapped file: nothing is copied, nothing can be written through them
    assert np.shares_memory(views["base"], views["slice"])
    assert not ours["model"]["text.embed.weight"].flags.writeable


def write_archive(path, obj, storages=None, prefix="archive"):
    """A torch-style zip written by hand: <prefix>/data.pkl (protocol 2) and data/<key>."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=2)
    pickler.persistent_id = lambda o: o.pid if isinstance(o, FakeStorage) else None
    pickler.dump(obj)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{prefix}/data.pkl", buf.getvalue())
        zf.writestr(f"{prefix}/byteorder", "little")
        for key, data in (storages or {}).items():
            zf.writestr(f"{prefix}/data/{key}", data)
        zf.writestr(f"{prefix}/version", "3\n")


class FakeStorage:
    def __init__(self, key, numel):
        self.pid = ("storage", torch.FloatStorage, key, "cpu", numel)


class FakeTensor:
    def __init__(self, storage, size):
        self.storage, self.size = storage, size

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.size, (1,), False, OrderedDict()))


class RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_handmade_archive_reads(tmp_path):
    """The hand-written archive format of the refusals below is one the reader accepts."""
    data = np.arange(4, dtype="<f4").tobytes()
    write_archive(tmp_path / "ok.pt", {"x": FakeTensor(FakeStorage("0", 4), (4,))}, {"0": data})
    np.testing.assert_array_equal(read_checkpoint_numpy(tmp_path / "ok.pt")["x"], np.arange(4))


def test_reader_refusals(tmp_path):
    model_path = tmp_path / "m.pt"
    save_checkpoint(model_path, text_model())
    cases = {"missing.pt": "file not found", "notzip.pt": "not a zip archive",
             "truncated.pt": "not a zip archive", "foreign.pt": "cannot be read",
             "evil.pt": "refused", "outside.pt": "outside its storage",
             "short.pt": "cannot be read", "list.pt": "not a dict"}
    (tmp_path / "notzip.pt").write_text("model weights, honest\n")
    data = model_path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with zipfile.ZipFile(tmp_path / "foreign.pt", "w") as zf:
        zf.writestr("readme.txt", "not a checkpoint")
    marker = tmp_path / "ran"
    write_archive(tmp_path / "evil.pt",
                  {"model_config": {}, "model": RunsCommand(f"touch '{marker}'")})
    write_archive(tmp_path / "outside.pt", {"x": FakeTensor(FakeStorage("0", 4), (100,))},
                  {"0": bytes(16)})
    write_archive(tmp_path / "short.pt", {"x": FakeTensor(FakeStorage("0", 400), (4,))},
                  {"0": bytes(16)})
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    for name, needle in cases.items():
        with pytest.raises(PcmeError) as e:
            read_checkpoint_numpy(tmp_path / name)
        msg = str(e.value)
        assert msg.startswith(f"checkpoint {tmp_path / name}: ") and "\n" not in msg, msg
        assert needle in msg, (name, msg)
        if name == "evil.pt":
            assert ".system" in msg, msg  # os.system pickles as posix.system
    assert not marker.exists()


def test_query_process_never_imports_torch(tmp_path):
    """A fresh process loads a checkpoint and encodes a query with numpy alone, and its μ and
    log σ² are the torch tower's."""
    model = text_model(**CONFIGS["class_words+channel"])
    save_checkpoint(tmp_path / "m.pt", model)
    code = (
        "import sys, numpy as np\n"
        "from encoders.model.text_numpy import NumpyTextTower\n"
        f"tower = NumpyTextTower.from_checkpoint({str(tmp_path / 'm.pt')!r})\n"
        "ids, extra, _ = tower.vocab.encode_batch(['w1 w7 w3', 'w20'])\n"
        "mu, lv = tower.forward(ids, extra)\n"
        f"np.save({str(tmp_path / 'mu.npy')!r}, mu)\n"
        f"np.save({str(tmp_path / 'lv.npy')!r}, lv)\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'torchvision', 'PIL', 'numba'})\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    ids = [[1, VOCAB.index("w1"), VOCAB.index("w7"), VOCAB.index("w3"), 2],
           [1, VOCAB.index("w20"), 2]]
    tokens, lengths = pad_tokens(ids)
    with torch.no_grad():
        mu, log_var = model.text(tokens, lengths)
    np.testing.assert_allclose(np.load(tmp_path / "mu.npy"), mu.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "lv.npy"), log_var.numpy(), rtol=0, atol=1e-5)
