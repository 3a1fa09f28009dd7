"""Process-wide settings (core/process.py): the OpenMP wait policy by command."""
import os

from typer.testing import CliRunner

from core.process import TORCH_ONLY, configure_process


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
