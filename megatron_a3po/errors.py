"""The errors a user can fix, and how every command line reports them.

Each subclass of `UserError` is raised with a message that names the problem and the fix. Every CLI (training,
SFT, pre-flight, a3po-convert, a3po plan / eval / plot) catches `UserError` in one place (`report`) and prints
one line and exits 2; anything else is a bug and keeps its traceback. A UserError raised inside a rank that
`spawn.run_in_ranks` started reaches the parent as the same exception object.

This module imports nothing of the package, so every module can import it (no import circles).
"""

from __future__ import annotations

import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Input the user can fix (flags, config files, checkpoints, data, reward hooks)."""


class ConfigError(UserError, ValueError):
    """A configuration mistake; the message names the offending flag(s) and how to fix it."""


class CheckpointError(UserError, ValueError):
    """A --load / --save directory that cannot be used; the message names the problem and the fix."""


class DatasetError(UserError, ValueError):
    """A dataset file or row is unusable; the message names the file, the row and the fix."""


class RunFilesError(UserError, ValueError):
    """A run directory's own files (metrics.jsonl) are damaged beyond what a killed run leaves; the message names
    the file, the line and the fix."""


class RewardError(UserError, ValueError):
    """Rewards cannot be trusted (worker pool cannot start, too many worker failures, a reward hook that does not
    import or score): stop, do not train on them."""


def flag_name(field_name: str) -> str:
    """The command-line flag of a config field, Megatron-LM's spelling: tensor_model_parallel_size ->
    --tensor-model-parallel-size (here because error messages everywhere name flags)."""
    return "--" + field_name.replace("_", "-")


def report(err: UserError, prefix: str = "error") -> int:
    """Print a UserError as one line on stderr; return the exit code every CLI uses for it."""
    message = " ".join(str(err).split("\n")) or type(err).__name__
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR
