"""The one error type users see.

Anything caused by the user's input (a config key or value, a path, a dataset file, a method
name) raises ``UserError`` with a single line that names the culprit. The CLI prints it as
``decoupled: error: <message>`` and exits with status 2; everything else is a bug and keeps
its traceback. A fault of the machine (``EnvironmentFault``: a full disk, a read-only store)
is one line too, exit status 74.
"""

import errno


class UserError(Exception):
    """A problem with the user's input, described in one line."""


class EnvironmentFault(UserError):
    """The machine, not the input: a full disk, a read-only folder or store. One line too."""

    exit_code = 74  # EX_IOERR


# what SQLite (through SQLAlchemy and MLflow) says, and what it means
_STORE_MESSAGES = {
    "database or disk is full": "no space left on device (database or disk is full)",
    "attempt to write a readonly database": "read-only (attempt to write a readonly database)",
    "unable to open database file": "cannot open its database file (a missing or read-only folder?)",
}
_OS_FAULTS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
              errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}


def environment_cause(error: BaseException | str) -> str | None:
    """What in the machine made ``error`` (or an error message) happen, in a few words, or None
    when it is not such a fault. Follows the chain of causes (MLflow wraps SQLAlchemy, which
    wraps sqlite3)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _OS_FAULTS:
            return _OS_FAULTS[error.errno] + (f": {error.filename}" if error.filename else "")
        text = str(error)
        for message, meaning in _STORE_MESSAGES.items():
            if message in text:
                return meaning
        if "No space left on device" in text:
            return _OS_FAULTS[errno.ENOSPC]
        if isinstance(error, str):
            return None
        error = error.__cause__ or error.__context__
    return None
