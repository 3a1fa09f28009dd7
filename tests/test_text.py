import numpy as np
import pytest

from encoders.model.text import SPECIALS, UNK, Vocab, build_vocab, glove_matrix, tokenize
from core.errors import PcmeError


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("Two People, waiting for a TRAIN!") == ["two", "people", "waiting", "for", "a", "train"]


def test_vocab_specials_first_and_min_count():
    vocab = build_vocab(["a dog", "a cat", "a dog"], min_count=2)
    assert vocab == SPECIALS + ["a", "dog"]


def test_encode_reports_unknown_words():
    v = Vocab(build_vocab(["a red car"]))
    ids, unknown = v.encode("a blue car")
    assert unknown == ["blue"]
    assert ids[0] == v.index["<start>"] and ids[-1] == v.index["<end>"]
    assert ids[2] == v.index[UNK] and ids[3] == v.index["car"]


def test_glove_text_file_any_dimension_and_spaces_in_words(tmp_path):
    # 840B-style: a "word" may contain spaces; the vector is always the last D fields
    f = tmp_path / "glove.tiny.3d.txt"
    f.write_text("dog 1 2 3\n. . . 4 5 6\ncat 0.5 -0.5 0.25\n", encoding="utf-8")
    vocab = SPECIALS + ["cat", "dog", "zebra"]
    mat, known = glove_matrix(vocab, str(f))
    assert mat.shape == (len(vocab), 3) and known == 2
    np.testing.assert_allclose(mat[vocab.index("dog")], [1, 2, 3])
    np.testing.assert_allclose(mat[vocab.index("cat")], [0.5, -0.5, 0.25])
    assert np.all(mat[0] == 0)  # <pad>


def test_glove_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(PcmeError, match="file not found"):
        glove_matrix(SPECIALS + ["dog"], str(tmp_path / "nope.txt"))


def test_offline_glove_package_knows_common_words():
    vocab = SPECIALS + ["train", "people", "qqqzzzxxw"]
    mat, known = glove_matrix(vocab)
    assert mat.shape == (len(vocab), 50) and known == 2
    # GloVe puts related words closer than unrelated ones
    more, _ = glove_matrix(SPECIALS + ["train", "bus", "banana"])
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert cos(more[4], more[5]) > cos(more[4], more[6])
