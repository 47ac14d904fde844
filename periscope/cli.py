"""Command-line conventions shared by every script: ``--help`` states each default once."""
from __future__ import annotations

import argparse


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
