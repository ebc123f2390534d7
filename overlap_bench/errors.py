"""The one error type that means "the user's input is wrong": the CLI prints its one-line message and exits 2.

Anything else is a bug or a failure of the machine and keeps its traceback."""


class UserError(ValueError):
    """Bad input; ``str()`` names the field and the fix in one line."""
