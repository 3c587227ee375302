"""One clear line instead of a traceback, for every entry point.

Every error a user can fix (a bad file, a bad value, a refused resume) is a :class:`UserError`: the suite's own error
types derive from it beside their built-in base (``class MIMICDataError(UserError, ValueError)``), so code that catches
``ValueError`` keeps working. The entry points (``train.py``, ``evaluate.py``, ``generate.py``, ``export.py``,
``reproduce.py``) run their ``main`` through :func:`run_main`, which prints ``<program>: error: <message>`` and exits 1;
``--debug`` anywhere on the command line shows the traceback instead.

A few errors from outside the suite are just as much the user's to fix and are caught the same way:
``PermissionError``/``FileNotFoundError``/``IsADirectoryError``/``NotADirectoryError`` (they name the file). A
``UnicodeDecodeError`` names no file, so readers of user text use :func:`read_text`, which raises a UserError instead.
"""
from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

EXIT_ERROR = 1


class UserError(Exception):
    """Something the user can fix; entry points print its message as one line (``--debug`` for the traceback)."""


class InsufficientSpaceError(UserError, OSError):
    """Too little free space for a file about to be written."""


def one_line(err: BaseException) -> str:
    """The error's message (``str(err)``; for an OSError ``filename: strerror``, not ``[Errno N] ...``), or its type name
    when it has none. The suite's messages are written as one line."""
    text = str(err).strip()
    if isinstance(err, OSError) and err.strerror:  # not "[Errno 28] ..."
        text = f"{err.filename}: {err.strerror}" if err.filename is not None else err.strerror
    return text or type(err).__name__


CAUGHT = (UserError, PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)


def run_main(program: str, main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None):
    """Call ``main(argv)``; a :data:`CAUGHT` error becomes ``<program>: error: …`` on stderr and exit status 1.

    ``--debug`` is taken out of ``argv`` and lets the traceback through instead. Returns what ``main`` returned (an int
    is the exit status).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv)
    except CAUGHT as err:
        if debug:
            raise
        message = one_line(err)
        if not message.startswith(f"{program}: error:"):
            message = f"{program}: error: {message}"
        print(message + "  (--debug shows the traceback)", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_ERROR) from None


def read_text(path: str | Path, what: str = "file") -> str:
    """A user's text file (score sheet, prompt file, config), UTF-8 with or without a byte-order mark.

    A file that is not UTF-8 is refused naming the file and the byte offset, not with a bare ``UnicodeDecodeError``.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: this {what} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                        "save it as UTF-8 (spreadsheet programs: 'CSV UTF-8')") from None


def check_free_space(path: str | Path, needed_bytes: int, what: str = "file") -> None:
    """Refuse to start writing ``what`` at ``path`` when its file system has less than ``needed_bytes`` free."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise InsufficientSpaceError(errno.ENOSPC, f"{path}: not enough free space for the {what} "
                                     f"({needed_bytes / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free on {folder})")


def writable_folder(path: str | Path, what: str) -> Path:
    """Create ``path`` if needed and check that files can be written in it; a clear error naming ``what`` otherwise."""
    path = Path(path)
    blocking = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserError(f"{what} {path} is a file, not a folder" if blocking == path
                        else f"{what} {path} cannot be made: {blocking} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{what} {path} is not writable ({err.strerror or err})") from None
    return path
