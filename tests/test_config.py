import pytest

from encoders.training.config import load_train_config
from core.errors import PcmeError


def test_file_then_flags_override(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('epochs = 3\nlr = 0.01\n[model]\nembed_dim = 64\n')
    cfg = load_train_config(f, {"epochs": 5, "lr": None})
    assert cfg.epochs == 5 and cfg.lr == 0.01 and cfg.model.embed_dim == 64


def test_json_config(tmp_path):
    f = tmp_path / "c.json"
    f.write_text('{"batch_size": 32, "model": {"resnet_layers": [2, 2, 2, 2]}}')
    cfg = load_train_config(f, {})
    assert cfg.batch_size == 32 and cfg.model.resnet_layers == (2, 2, 2, 2)


@pytest.mark.parametrize("text,needle", [
    ('epocs = 3\n', "unknown key"),
    ('epochs = "three"\n', "'epochs' must be a number"),
    ('epochs = 2.5\n', "whole number"),
    ('amp = 1\n', "true or false"),
    ('[model]\nembed = 3\n', "unknown key"),
    ('epochs = \n', "cannot parse"),
    ('eval_scores = ["mu", "elkk"]\n', r"eval_scores \['elkk'\] unknown; choose from"),
    ('eval_scores = "mu"\n', "'eval_scores' must be a list of strings"),
    ('positives = "all"\n', "positives 'all' is unknown"),
])
def test_bad_configs_name_the_file_and_key(tmp_path, text, needle):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(PcmeError, match=needle) as e:
        load_train_config(f, {})
    assert "bad.toml" in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(PcmeError, match="file not found"):
        load_train_config(tmp_path / "none.toml", {})
