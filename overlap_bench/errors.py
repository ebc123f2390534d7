"""Errors the CLI turns into one line: :class:`UserError` (bad input, exit 2) and operating-system errors
(:func:`os_error_exit`: a path the user gave, exit 2; the machine, exit 1). Anything else keeps its traceback."""

from __future__ import annotations

import errno
import os


class UserError(ValueError):
    """Bad input; ``str()`` names the field and the fix in one line."""

    def __init__(self, message: str):
        # One line whatever a file holds: control characters in a key or name are shown escaped, as repr() would.
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message)))


# A path the user named cannot be used as asked (exit 2); anything else (disk full, I/O error) is the machine's.
USER_PATH_ERRNOS = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM,
                    errno.EROFS, errno.ENOENT, errno.ELOOP, errno.ENOTEMPTY}


def describe_os_error(exc: OSError) -> str:
    """One line: ``<path>: <what the system said>`` (no errno numbers, no traceback)."""
    what = exc.strerror or (os.strerror(exc.errno) if exc.errno else type(exc).__name__)
    if exc.errno == errno.ENAMETOOLONG:
        what += " (a path component over 255 bytes or a path over 4096)"
    names = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else exc.filename
    return f"{names}: {what}" if names else what


def os_error_exit(exc: OSError) -> tuple[str, int]:
    """The one-line message and exit code for an operating-system error that reached the command line."""
    code = 2 if exc.errno in USER_PATH_ERRNOS else 1
    hint = "check the path you gave" if code == 2 else "check the machine (disk space, limits) and run again"
    return f"{describe_os_error(exc)}; {hint}", code
