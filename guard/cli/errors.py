"""One error type for the CLI and one place that turns it into a message and exit code.

Imports only the stdlib. Every command raises `CliError` (or lets `main` map a known
foreign exception) so users see what went wrong and what to do, never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_USAGE = 2
EXIT_FAILURE = 1


@dataclass
class CliError(Exception):
    """A failure the user can act on: `message` says what happened, `hint` what to do."""

    message: str
    hint: str | None = None
    exit_code: int = EXIT_FAILURE

    def __str__(self) -> str:
        return self.message

    def diagnostics(self) -> str:
        text = f"error: {self.message}"
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text
