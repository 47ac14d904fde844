"""Command-line conventions shared by every script.

``--help`` states each default once (``HelpFormatter``); a flag's value that
cannot be parsed is one usage line naming the flag (``argument_type``); a step
that cannot go on raises ``Refused`` with the line to print and the exit code;
SIGTERM stops a script as Ctrl-C does (``sigterm_as_ctrl_c``).
"""
from __future__ import annotations

import argparse
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with defaults, stated once and only where they say something.

    argparse's own formatter appends ``(default: ...)`` to every option, which
    prints ``(default: True)`` on a ``--no-...`` switch and ``(default: None)``
    after a help text that already says what happens without the option. This
    one leaves out switches, ``None`` and texts that mention their default.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or any(action.default is value for value in (None, True, False, argparse.SUPPRESS))
                or action.nargs == 0 or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


class Refused(Exception):
    """A script's step cannot go on; the message says why and what to do, ``code`` is the exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def argument_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """``parse`` as an argparse ``type``: its ``ValueError`` becomes the one-line usage error of the flag."""

    def value(text: str) -> T:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return value


@contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Inside, SIGTERM (``kill``, a scheduler stopping a job) raises ``KeyboardInterrupt``, as Ctrl-C does."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
