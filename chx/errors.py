"""User-facing errors.

A :class:`ChxError` is a mistake the user can fix (bad input, wrong option, missing file). The CLI
prints its message as one line and exits with code 2; it never shows a traceback for it. Messages
say what is wrong, where (file, row, column, option) and what to do.
"""


class ChxError(Exception):
    """A user-fixable error, reported as one line by the CLI (exit code 2)."""


class ManifestError(ChxError):
    """The manifest table breaks the schema (names the file, row and column)."""


class ImageReadError(ChxError):
    """An image file cannot be read or decoded (names the file)."""


class Interrupted(Exception):
    """A stage was stopped by SIGINT/SIGTERM after saving what lets it continue; a command that
    composes stages (``chx demo``) stops there too. The CLI prints the message as one line and
    exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = int(signum)
