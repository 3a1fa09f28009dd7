"""Training loop behaviour: resume is exact, kill -9 then --resume finishes, two stages, accumulation."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from encoders.model.config import ModelConfig
from encoders.training.config import TrainConfig
from encoders.training.train import Trainer
from tests.helpers import kill_9_when, wait_for

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = dict(embed_dim=16, resnet_width=8, gru_hidden=16, attn_hidden=8)


def tiny(tmp_path, **kw) -> TrainConfig:
    base = dict(root=str(tmp_path / "data"), out=str(tmp_path / "run"), train_images=64,
                batch_size=16, epochs=2, n_samples=2, ckpt_every=1, warmup_steps=2,
                device="cpu", model=ModelConfig(**TINY_MODEL))
    base.update(kw)
    return TrainConfig(**base)


def weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.slow
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    full = Trainer(tiny(tmp_path, out=str(tmp_path / "full")))
    full.fit()
    expected = weights(full)

    cfg = tiny(tmp_path, out=str(tmp_path / "cut"))
    cut = Trainer(cfg)
    real_step, calls = cut.train_step, []

    def dying_step(micro):
        if len(calls) == 5:  # 5 of 8 optimiser steps done (mid-epoch 2), last.pt at step 5
            raise KeyboardInterrupt
        calls.append(1)
        return real_step(micro)

    monkeypatch.setattr(cut, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    resumed = Trainer(cfg, resume=True)
    assert (resumed.epoch, resumed.step_in_epoch, resumed.step) == (1, 1, 5)
    resumed.fit()
    assert resumed.step == full.step == 8
    for k, v in weights(resumed).items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_frozen_backbone_stage_then_end_to_end(tmp_path):
    t = Trainer(tiny(tmp_path, freeze_backbone_epochs=1, epochs=2))
    before = weights(t)
    t.run_epoch(lambda row: None)
    after1 = weights(t)
    for k in before:
        if k.startswith("image.backbone."):
            torch.testing.assert_close(after1[k], before[k], rtol=0, atol=0, msg=k)
    assert not torch.equal(after1["image.head.fc.weight"], before["image.head.fc.weight"])
    t.run_epoch(lambda row: None)
    assert not torch.equal(weights(t)["image.backbone.layer1.0.conv1.weight"],
                           after1["image.backbone.layer1.0.conv1.weight"])


@pytest.mark.slow
def test_gradient_accumulation_counts_optimiser_steps(tmp_path):
    t = Trainer(tiny(tmp_path, accum_steps=2, epochs=1))
    assert t.steps_per_epoch == 64 // (16 * 2)
    t.fit()
    assert t.step == 2 and t.opt.state_dict()["state"][0]["step"] == 2


@pytest.mark.slow
def test_kill_9_mid_training_then_resume_finishes(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text("batch_size = 16\nn_samples = 2\nckpt_every = 1\nepochs = 12\nexport = false\n"
                   "eval_split = \"val\"\n"
                   "train_images = 64\n[model]\nembed_dim = 16\nresnet_width = 8\ngru_hidden = 16\n"
                   "attn_hidden = 8\n")
    args = [sys.executable, "cli.py", "train", "--config", str(cfg), "--root", str(tmp_path / "data"),
            "--out", str(tmp_path / "run"), "--device", "cpu"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # log.jsonl gets a row every 10 optimiser steps: step 10 is in epoch 3 of 12, and
    # last.pt (saved every step, atomically) is at least at step 9
    row = kill_9_when(proc, lambda: wait_for(lambda: _logged_step(tmp_path / "run" / "log.jsonl"),
                                             proc, 120, "a training log row"))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert row["step"] - 1 <= last["step"] < 12 * 4
    done = subprocess.run(args[:3] + ["--resume"] + args[3:], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 12 and ckpt["step"] == 12 * 4
    # it went on from where last.pt stood when the process died
    assert f"at epoch {last['epoch']}, batch {last['step_in_epoch']}" in done.stderr


def _logged_step(log):
    """The first complete training-step row of a log.jsonl (the run's start event comes
    before it), or None while there is none."""
    try:
        lines = log.read_text().split("\n")[:-1]   # the last piece may be half-written
    except FileNotFoundError:
        return None
    rows = [json.loads(line) for line in lines]
    return next((r for r in rows if "step" in r), None)


@pytest.mark.slow
def test_match_scalars_have_their_own_learning_rate_and_no_decay(tmp_path):
    t = Trainer(tiny(tmp_path, match_lr_scale=20.0, lr=1e-3, epochs=1))
    groups = t.opt.param_groups
    assert [id(p) for p in groups[1]["params"]] == [id(t.model.a_raw), id(t.model.b)]
    assert groups[1]["weight_decay"] == 0.0 and groups[2]["weight_decay"] == t.cfg.weight_decay
    assert groups[1]["lr"] == pytest.approx(20 * groups[2]["lr"])
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(t.model.parameters()))  # every parameter in exactly one group
    b0 = t.model.b.item()
    t.fit()
    # Adam moves a scalar by about its lr per step: far more than the rest's lr allows
    assert abs(t.model.b.item() - b0) > 2 * t.cfg.lr * t.step


@pytest.mark.slow
@pytest.mark.parametrize("native,amp,expected", [(True, True, torch.bfloat16),
                                                 (False, True, torch.float32),
                                                 (True, False, torch.float32)])
def test_cpu_steps_run_in_bf16_only_where_native(tmp_path, monkeypatch, native, amp, expected):
    """`amp` on a CPU: the image backbone runs in bf16 when the CPU has it natively (else
    float32); the μ/σ heads and the weights stay float32 and the step still learns."""
    import encoders.training.precision as precision
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: native)
    t = Trainer(tiny(tmp_path, amp=amp, epochs=1))
    seen, heads = [], []
    t.model.image.backbone.layer4.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    t.model.image.head.fc_var.register_forward_hook(lambda m, i, out: heads.append(out.dtype))
    before = weights(t)
    t.run_epoch(lambda row: None)
    assert seen and set(seen) == {expected} and set(heads) == {torch.float32}
    after = weights(t)
    assert all(v.dtype == before[k].dtype and torch.isfinite(v.float()).all()
               for k, v in after.items())
    assert not torch.equal(after["image.head.fc.weight"], before["image.head.fc.weight"])
