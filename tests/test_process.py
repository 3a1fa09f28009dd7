"""Process-wide settings (core/process.py): the OpenMP wait policy by command, numpy's BLAS
on one thread."""
import os

import numpy
import pytest
from threadpoolctl import ThreadpoolController
from typer.testing import CliRunner

from core.process import TORCH_ONLY, configure_process, numpy_blas_threads


def _blas_threads() -> dict:
    """{library path: threads} of every BLAS library loaded in this process."""
    return {i["filepath"]: i["num_threads"] for i in ThreadpoolController().info()
            if i["user_api"] == "blas"}


@pytest.fixture(autouse=True)
def _restore_numpy_blas():
    before = _blas_threads()
    yield
    numpy_blas_threads(max(n for path, n in before.items() if "numpy" in path))


def test_numpy_blas_runs_on_one_thread_and_the_others_keep_theirs(monkeypatch):
    import faiss  # noqa: F401  (its own OpenBLAS, OpenMP-threaded: not numpy's)
    numpy_blas_threads(2)
    before = _blas_threads()
    numpy_dir = os.path.dirname(os.path.dirname(numpy.__file__))
    ours = [p for p in before if p.startswith(os.path.join(numpy_dir, "numpy"))]
    assert ours and len(before) > len(ours)        # numpy's and faiss' libraries both loaded
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")   # an explicit setting wins
    configure_process("query")
    assert _blas_threads() == before
    monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    configure_process("query")
    after = _blas_threads()
    assert all(after[p] == 1 for p in ours)
    assert all(after[p] == before[p] for p in before if p not in ours)


def test_training_and_eval_wait_actively_the_rest_passively(monkeypatch):
    for command, policy in (("train", "ACTIVE"), ("eval", "ACTIVE"), ("encode", "PASSIVE"),
                            ("query", "PASSIVE"), ("serve", "PASSIVE"), ("bench", "PASSIVE"),
                            (None, "PASSIVE")):
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        configure_process(command)
        assert os.environ["OMP_WAIT_POLICY"] == policy, command
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")      # an explicit setting wins
    configure_process("train")
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_the_cli_sets_the_policy_of_the_command_it_runs(monkeypatch):
    import cli

    assert TORCH_ONLY <= {c.name or c.callback.__name__ for c in cli.app.registered_commands}
    for command, policy in (("eval", "ACTIVE"), ("query", "PASSIVE")):
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        result = CliRunner().invoke(cli.app, [command, "--help"])
        assert result.exit_code == 0, result.output
        assert os.environ["OMP_WAIT_POLICY"] == policy, command


class _Node:
    """A reference cycle, which only the collector frees (not reference counting)."""

    def __init__(self):
        self.me = self


def test_settle_heap_freezes_what_lives_and_a_second_call_frees_dropped_cycles():
    import gc
    import weakref

    from core.process import settle_heap

    try:
        old = _Node()                       # e.g. an engine loaded at start-up
        gone = weakref.ref(old)
        settle_heap()
        assert gc.get_freeze_count() > 0
        assert not gc.is_finalized(old)
        del old                             # the engine is replaced: its cycle is garbage
        gc.collect()
        assert gone() is not None           # frozen: the collector does not see it
        settle_heap()                       # what the service does after a swap
        assert gone() is None               # unfrozen, collected
        fresh = _Node()
        fresh_ref = weakref.ref(fresh)
        del fresh
        gc.collect()
        assert fresh_ref() is None          # objects made after a settle are collected as ever
    finally:
        gc.unfreeze()
