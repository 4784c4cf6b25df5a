"""The one error type users see.

Anything caused by the user's input (a config key or value, a path, a dataset file, a method
name) raises ``UserError`` with a single line that names the culprit. The CLI prints it as
``decoupled: error: <message>`` and exits with status 2; everything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, described in one line."""
