"""The command-line conventions of ``periscope/cli.py``, with real argparse and real signals."""
from __future__ import annotations

import argparse
import signal

import pytest

from periscope import cli


def test_a_value_the_parser_refuses_is_one_usage_line_naming_the_flag(capsys):
    def even(text: str) -> int:
        if int(text) % 2:
            raise ValueError(f"{text!r} is odd")
        return int(text)

    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--n", type=cli.argument_type(even))
    assert parser.parse_args(["--n", "4"]).n == 4
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--n", "3"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "tool: error: argument --n: '3' is odd"


def test_sigterm_raises_keyboard_interrupt_inside_and_the_old_handler_is_back_after():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with cli.sigterm_as_ctrl_c():
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before

