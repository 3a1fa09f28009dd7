"""Run folders: a finished or interrupted run is never replaced silently, one writer at a time,
Ctrl-C prints the command that resumes, log.jsonl belongs to one run, the folder has a manifest."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.errors import PcmeError
from encoders.training import runs
from encoders.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def fake_train(outcome="finish"):
    """Stands in for the training loop: writes what a run writes (log rows, last.pt, then
    checkpoint.pt), or is interrupted after last.pt."""
    def train(cfg, resume=False):
        out = Path(cfg.out)
        with open(out / "log.jsonl", "a") as log:
            log.write(json.dumps({"step": 1, "resume": resume}) + "\n")
        (out / "last.pt").write_bytes(b"weights")
        if outcome == "interrupt":
            raise KeyboardInterrupt
        (out / "checkpoint.pt").write_bytes(b"final weights")
        return {"train_s": 1.0, "checkpoint": str(out / "checkpoint.pt"), "eval": {}}
    return train


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setattr("encoders.training.train.train", fake_train())
    return TrainConfig(out=str(tmp_path / "run"), export=False)


def log_rows(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_finished_run_is_refused_then_resumed_or_replaced(cfg, monkeypatch):
    runs.run_training(cfg)
    out = Path(cfg.out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "run" and manifest["status"] == "finished"
    assert manifest["checkpoint_sha256"] == __import__("hashlib").sha256(b"final weights").hexdigest()
    assert json.loads((out / "config.json").read_text())["out"] == cfg.out

    with pytest.raises(PcmeError, match=r"holds a finished run \(checkpoint.pt\); add --resume "
                                        r"to continue it, --force to replace it"):
        runs.run_training(cfg)
    runs.run_training(cfg, resume=True)                  # same run: one log, two sessions
    assert [r.get("event") for r in log_rows(out)] == ["start", None, "resume", None]
    runs.run_training(cfg, force=True)                   # a new run: a new log
    assert [r.get("event") for r in log_rows(out)] == ["start", None]


def test_interrupted_run_says_how_to_resume(cfg, monkeypatch):
    monkeypatch.setattr("encoders.training.train.train", fake_train("interrupt"))
    with pytest.raises(runs.RunInterrupted) as caught:
        runs.run_training(cfg)
    out = Path(cfg.out)
    command = shlex.split(caught.value.resume)
    assert command[1:] == ["cli.py", "train", "--config", str(out / "config.json"), "--resume"]
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    with pytest.raises(PcmeError, match="holds an interrupted run"):
        runs.run_training(cfg)


def test_a_run_that_fails_before_any_progress_leaves_nothing(cfg, monkeypatch):
    def bad_flag(cfg, resume=False):
        (Path(cfg.out) / "log.jsonl").write_text("{}\n")
        raise PcmeError("device tpu: unknown")
    monkeypatch.setattr("encoders.training.train.train", bad_flag)
    with pytest.raises(PcmeError, match="tpu"):
        runs.run_training(cfg)
    assert not Path(cfg.out).exists()


def test_resume_with_nothing_to_resume_is_refused(cfg):
    with pytest.raises(PcmeError, match="holds no run to continue"):
        runs.run_training(cfg, resume=True)


def test_a_second_writer_is_refused_naming_the_first(cfg):
    out = Path(cfg.out)
    out.mkdir(parents=True)
    with runs.RunLock(out):   # another open file description: flock conflicts as between processes
        with pytest.raises(PcmeError, match=f"another train \\(pid {os.getpid()}\\) is writing"):
            runs.run_training(cfg)
    runs.run_training(cfg)    # released: the folder is free again


@pytest.mark.slow
def test_two_trains_then_ctrl_c_then_the_printed_command(tmp_path):
    """Real processes: B into A's folder fails at once naming A's pid; SIGINT to A exits 130
    with the resume command; that command, pasted, finishes the run; a plain rerun is refused."""
    cfg = tmp_path / "tiny.toml"
    cfg.write_text("batch_size = 16\nn_samples = 2\nckpt_every = 1\nepochs = 20\nexport = false\n"
                   "eval_split = \"val\"\ntrain_images = 64\n[model]\nembed_dim = 16\n"
                   "resnet_width = 8\ngru_hidden = 16\nattn_hidden = 8\n")
    out = tmp_path / "my run"
    args = [sys.executable, "cli.py", "train", "--config", str(cfg), "--root",
            str(tmp_path / "data"), "--out", str(out), "--device", "cpu"]
    # A Ctrl-C in a terminal: SIGINT at its default even when this test runs where it is ignored
    # (a shell's background job), since a child inherits an ignored signal and Python then
    # installs no KeyboardInterrupt handler.
    first = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 180
    while not (out / "last.pt").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert first.poll() is None, "training ended before the test could interrupt it"

    second = subprocess.run(args + ["--force"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    assert f"another train (pid {first.pid}) is writing this run folder" in second.stderr

    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    line = [l for l in err.splitlines() if l.startswith("interrupted; resume with: ")]
    assert len(line) == 1, err
    command = shlex.split(line[0].removeprefix("interrupted; resume with: "))
    assert "Traceback" not in err

    refused = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--resume" in refused.stderr and "--force" in refused.stderr

    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "checkpoint.pt").is_file()
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"
    events = [r["event"] for r in log_rows(out) if "event" in r]
    assert events == ["start", "resume"]
