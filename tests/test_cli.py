"""franca.utils.cli.run_command: the exit codes and the one-line user errors of the training commands."""

import pytest

from franca.utils.cli import run_command
from franca.utils.config_schema import ConfigError


def _raise(error: Exception):
    raise error


@pytest.mark.parametrize(
    "main, code",
    [(lambda: {}, 0), (lambda: None, 1), (lambda: _raise(ConfigError("a.b=1: set it")), 2)],
    ids=["result", "none", "config error"],
)
def test_exit_codes(main, code):
    with pytest.raises(SystemExit) as exit_:
        run_command(main)
    assert exit_.value.code == code


def test_a_user_error_is_one_line_on_stderr(capsys):
    with pytest.raises(SystemExit):
        run_command(lambda: _raise(FileNotFoundError("train.dataset_path='x': no such folder")))
    assert capsys.readouterr().err == "error: train.dataset_path='x': no such folder\n"


def test_other_errors_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        run_command(lambda: 1 / 0)
