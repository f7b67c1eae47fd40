"""One error type for the CLI and one place that turns it into a message and exit code.

Imports only the stdlib. Every command raises `CliError` (or lets `main` map a known
foreign exception) so users see what went wrong and what to do, never a traceback.
"""

from __future__ import annotations

import sys

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure the user can act on: `message` says what happened, `hint` what to do."""

    def __init__(
        self, message: str, hint: str | None = None, exit_code: int = EXIT_FAILURE
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, hint={self.hint!r})"

    def __str__(self) -> str:
        return self.message

    def diagnostics(self) -> str:
        text = f"error: {self.message}"
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


def outcome(exc: CliError | KeyboardInterrupt) -> int:
    """Report `exc` on stderr as the user should see it (`error:`/`hint:` lines, nothing
    for Ctrl-C); the exit code."""
    if isinstance(exc, CliError):
        print(exc.diagnostics(), file=sys.stderr)
        return exc.exit_code
    return EXIT_INTERRUPTED
