"""Errors that the CLI turns into one line on stderr and a documented exit code.

Exit codes (docs/architecture.md): 0 success or up to date, 1 failure, 2 usage error,
3 invalid or incomplete input artifact, 75 lock held by another run.
Stages may define further codes; they are listed in each command's --help.
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_INTERRUPTED = 4  # pretrain: stopped by a signal or --max-wall-time after saving a checkpoint
EXIT_GATE = 5  # a quality gate (--max-ppl-increase, --fail-below) tripped; the artifact is kept
EXIT_LOCKED = 75

EXIT_CODES_HELP = ("Exit codes: 0 success (or up to date), 1 failure, 2 usage error, "
                   "3 invalid or incomplete input, 75 lock held by another run.")


class GlmctlError(Exception):
    """An expected failure: the message is shown as one line, no traceback."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(GlmctlError):
    exit_code = EXIT_USAGE


class InputError(GlmctlError):
    """Bad or incomplete input artifact / data. The message names the file (and line)."""

    exit_code = EXIT_BAD_INPUT


class LockHeld(GlmctlError):
    exit_code = EXIT_LOCKED


class GateFailed(GlmctlError):
    exit_code = EXIT_GATE
