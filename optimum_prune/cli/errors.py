"""How the CLI reports a failure: one ``error: ...`` line (exit 2), Ctrl-C (exit 130), OS errors as path + cause.

Imports stay light here (no torch): the exception classes are imported only once a command has failed.
``--debug`` prints the full traceback before the one line.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from typing import Callable

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

_OS_CAUSES = {
    errno.ENOSPC: "no space left on device (free some space or write elsewhere)",
    errno.EDQUOT: "disk quota exceeded (free some space or write elsewhere)",
    errno.EACCES: "permission denied (check the permissions, or choose another path)",
    errno.EPERM: "operation not permitted (check the permissions, or choose another path)",
    errno.EROFS: "read-only file system (choose another path)",
    errno.EIO: "input/output error (a failing disk or network file system?)",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files",
}
_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed", "unexpected pos", "file write failed")


def _expected() -> tuple[type[BaseException], ...]:
    """The exception types that mean a bad request or environment, not a bug (imported only after a failure)."""
    from .. import PruningConfigError, UnsupportedArchitectureError
    from ..calibration import CalibrationError
    from ..engine.checkpoint import CheckpointError
    from ..evaluation.table_measure import BusyMachineError
    from ..methods.ziplm.entry import SpeedupMissError
    from ..session import PushError
    from ..text import DatasetUnavailableError

    return (PruningConfigError, UnsupportedArchitectureError, argparse.ArgumentTypeError, ImportError,
            CalibrationError, CheckpointError, DatasetUnavailableError, FileNotFoundError, ValueError, PushError,
            BusyMachineError, SpeedupMissError)


def one_line(text: str) -> str:
    """A message's lines joined into one (tracebacks and tables never reach the user's terminal)."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def os_message(err: OSError) -> str | None:
    """'<path>: <cause>' for an OSError the user can fix (full disk, permissions, ...); None for others."""
    cause = _OS_CAUSES.get(err.errno or -1)
    if cause is None:
        return None
    path = err.filename if err.filename is not None else None
    where = f"{os.fspath(path)}: " if path is not None else ""
    if err.filename2 is not None:
        where = f"{os.fspath(path)} -> {os.fspath(err.filename2)}: "
    return where + cause


def describe(err: BaseException) -> str | None:
    """The one-line text of an expected failure, or None for a bug (which keeps its traceback)."""
    chain, seen = [], set()
    cursor: BaseException | None = err
    while cursor is not None and id(cursor) not in seen:  # the OS cause may sit under a library's wrapper
        seen.add(id(cursor))
        chain.append(cursor)
        cursor = cursor.__cause__ or cursor.__context__
    for item in chain:
        if isinstance(item, OSError):
            message = os_message(item)
            if message is not None:
                return message
    text = str(err)
    if "No space left on device" in text or "os error 28" in text:
        return f"{one_line(text)}: no space left on device (free some space or write elsewhere)"
    if isinstance(err, RuntimeError) and any(s in text for s in _TORCH_WRITE_FAILED):
        return (f"PyTorch could not write a file ({one_line(text)}): the disk may be full or the directory "
                "not writable")
    if isinstance(err, _expected()):
        return one_line(text) or type(err).__name__
    return None


def checkpoint_dir_of(err: BaseException, args: argparse.Namespace) -> str | None:
    """The checkpoint_dir a rerun resumes from: the one the interrupted loop used, else --checkpoint-dir."""
    return getattr(err, "checkpoint_dir", None) or getattr(args, "cfg__checkpoint_dir", None)


def run_command(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run ``command(args)``; an expected failure prints one line on stderr and returns its exit code."""
    debug = bool(getattr(args, "debug", False))
    try:
        return command(args)
    except KeyboardInterrupt as err:
        if debug:
            traceback.print_exc()
        where = checkpoint_dir_of(err, args)
        print(f"interrupted; rerun the same command to resume from {where}" if where else "interrupted",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        message = describe(err)
        if message is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR
