"""The argument parser of every command line: argparse without abbreviations.

Megatron-LM's arguments.py sets allow_abbrev=False: with abbreviations on, a flag added later can silently change
what an abbreviation means (today `--max-prompt-len` is --max-prompt-length; tomorrow it is ambiguous or
another flag). Refusing one names the flag(s) it abbreviates. Subparsers (add_subparsers) are FlagParsers too.
This module imports nothing of the package.
"""

from __future__ import annotations

import argparse


class FlagParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        head, _, unknown = message.partition("unrecognized arguments: ")
        hints = []
        for arg in unknown.split() if not head else []:
            flag = arg.partition("=")[0]
            full = sorted(o for o in self._option_string_actions if flag.startswith("--") and o.startswith(flag))
            if full:
                hints.append(f"{flag} abbreviates {' or '.join(full)}")
        if hints:
            message += f" ({'; '.join(hints)}: flags are not abbreviated, spell them in full)"
        super().error(message)
