"""The mistakes a user can make, and how every entry point reports them.

A `UsageError` is a setting, a file or a model the user asked for that cannot be used. An entry point
run through `run_main` prints it as one line on stderr and exits with code 2: a traceback would bury the
one fact the user needs under code they did not write. Any other exception is a bug and keeps its
traceback. `--debug` (accepted by every entry point) or `CLLM_DEBUG=1` shows the traceback of a usage
error too.

Each class subclasses ValueError, so code and tests that catch ValueError keep working.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TypeVar

DEBUG_FLAG = "--debug"
DEBUG_ENV = "CLLM_DEBUG"
USAGE_EXIT_CODE = 2  # what argparse and most Unix tools return for a bad command line

T = TypeVar("T")


class UsageError(ValueError):
    """Something the user asked for cannot be used; the message names it and what would be valid."""


class ConfigError(UsageError):
    """A config file or command-line setting that cannot be used."""


class DataError(UsageError):
    """A dataset or records file that is missing, unreadable, or leaves no prompt to use."""


class ModelLoadError(UsageError):
    """The model path or name cannot be loaded as a causal LM."""


class UnsupportedModelError(UsageError):
    """A model that Jacobi decoding cannot decode exactly (its cache, positions or attention rule it out)."""


def one_line(err: BaseException) -> str:
    """The error's message on one line (a wrapped library message may span several)."""
    return " ".join(str(err).split()) or type(err).__name__


def unwrapped(err: UsageError) -> UsageError:
    """The error as raised: Ray re-raises a task's exception as a RayTaskError that is also an instance of
    the original class but carries the remote traceback in its message; its `cause` is the original."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, UsageError) else err


def debugging(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_main(main: Callable[[list[str]], T], argv: Sequence[str] | None = None) -> T:
    """Run an entry point's `main(argv)` (argv: sys.argv[1:] unless given, `--debug` taken out first).

    A UsageError ends the process with `error: <message>` on stderr and exit code 2; with --debug or
    CLLM_DEBUG=1 its traceback comes first. Any other exception propagates untouched.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debugging(argv)
    try:
        return main([arg for arg in argv if arg != DEBUG_FLAG])
    except UsageError as err:
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(unwrapped(err))}", file=sys.stderr, flush=True)
        raise SystemExit(USAGE_EXIT_CODE) from None
