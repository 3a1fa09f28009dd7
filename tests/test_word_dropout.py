"""Word dropout (training option, off by default): which words a step keeps, and that it is off
unless asked for and rejected outside [0, 1)."""
import numpy as np
import pytest

from core.errors import PcmeError
from encoders.training.config import TrainConfig, load_train_config
from encoders.training.train import drop_words


def test_drop_words_keeps_order_and_at_least_one_word():
    rng = np.random.default_rng(0)
    ids = list(range(10, 20))
    kept_counts = []
    for _ in range(2000):
        kept = drop_words(ids, 0.3, rng)
        assert kept and kept == sorted(kept) and set(kept) <= set(ids)
        kept_counts.append(len(kept))
    # each of 10 words kept with probability 0.7: mean 7 (binomial sd of the mean ~0.02)
    assert np.mean(kept_counts) == pytest.approx(7.0, abs=0.1)
    for _ in range(200):   # p close to 1: nearly always all dropped, so the rescue keeps one
        assert len(drop_words(ids, 0.999, rng)) >= 1


def test_no_dropout_draws_nothing_and_changes_nothing():
    """p = 0 leaves the random stream untouched, so the default recipe's runs are what they
    were before the option existed (flips are drawn from the same stream)."""
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    assert drop_words([1, 2, 3], 0.0, a) == [1, 2, 3]
    assert drop_words([7], 0.5, a) == [7]
    assert a.random() == b.random()
    assert TrainConfig().word_dropout == 0.0


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2])
def test_word_dropout_outside_unit_interval_is_one_line_error(bad):
    with pytest.raises(PcmeError, match="'word_dropout' must be in \\[0, 1\\)"):
        load_train_config(None, {"word_dropout": bad})
