"""Every way a `guard` command line ends, as one exit code and at most `error:`/`hint:` lines.

typer ≥ 0.29 raises the exceptions of its own bundled click (`typer._click`), older typer
those of the standalone `click` package; `exit_code` handles both flavours in one place.
`GuardGroup` (the class of every `guard` command group) runs it for the `guard` script
and `typer.testing.CliRunner` alike, so a usage error never shows a traceback: it is one
line saying what is wrong and a hint saying what to type instead (exit 2). Every command
is a `GuardCommand`, so the hint can show that command's usage.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from difflib import get_close_matches
from types import ModuleType
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from guard.cli.errors import EXIT_USAGE, CliError

EXIT_INTERRUPTED = 130
_HINT = "guard.usage_hint"  # a hint for the usage error being raised, kept in ctx.meta


def _click_flavours() -> list[ModuleType]:
    """The exception modules of the clicks that can have raised: typer's bundled copy and,
    once anything imported it, the standalone package (else nothing raised its exceptions)."""
    found = []
    try:
        from typer._click import exceptions as bundled

        found.append(bundled)
    except ImportError:  # typer < 0.29 raises the standalone package's exceptions
        pass
    standalone = sys.modules.get("click.exceptions")
    if standalone is not None:
        found.append(standalone)
    return found


def exit_code(exc: BaseException) -> int:
    """Report `exc` on stderr as the user should see it; the exit code. Re-raises what is
    not a CLI outcome (a bug keeps its traceback)."""
    if isinstance(exc, CliError):
        print(exc.diagnostics(), file=sys.stderr)
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    error: Any = exc
    for flavour in (typer, *_click_flavours()):
        if isinstance(exc, getattr(flavour, "Exit", ())):
            return int(error.exit_code)
        if isinstance(exc, getattr(flavour, "Abort", ())):
            return EXIT_INTERRUPTED
        if isinstance(exc, getattr(flavour, "UsageError", ())):
            return exit_code(usage_error(error))
        if isinstance(exc, getattr(flavour, "ClickException", ())):
            return exit_code(CliError(_sentence(error.format_message()), exit_code=error.exit_code))
    raise exc


def usage_error(exc: Any) -> CliError:
    """A click `UsageError` (either flavour) as a one-line `CliError` with a hint."""
    ctx = exc.ctx
    if ctx is None:
        return CliError(
            _sentence(exc.format_message()), hint="see `guard --help`", exit_code=EXIT_USAGE
        )
    path = ctx.command_path
    nothing_given = type(exc).__name__ == "NoArgsIsHelpError"  # its message is the whole help
    commands = getattr(ctx.command, "commands", None)
    if commands is not None and (nothing_given or exc.message == "Missing command."):
        return CliError(
            "missing command",
            hint=f"`{path}` takes one of: {', '.join(commands)} (see `{path} --help`)",
            exit_code=EXIT_USAGE,
        )
    message = "missing arguments" if nothing_given else _sentence(exc.format_message())
    hint = ctx.meta.pop(_HINT, None)
    if hint is None:
        usage = " ".join(ctx.get_usage().split()).removeprefix("Usage: ")
        hint = f"usage: {usage} (see `{path} --help`)"
    return CliError(message, hint=hint, exit_code=EXIT_USAGE)


def _is_usage_error(exc: BaseException) -> bool:
    return any(isinstance(exc, flavour.UsageError) for flavour in _click_flavours())


def _sentence(text: str) -> str:
    """click's message as one line in `gh`'s style: lower-case start, no final period."""
    line = next((part.strip() for part in text.splitlines() if part.strip()), "usage error")
    line = line.removesuffix(".")
    return line[:1].lower() + line[1:]


class _KnowsItsContext:
    """click's parser raises some usage errors without the context (`--db` given no
    value); attach it, so the report can name the command and show its usage."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)  # type: ignore[misc]
        except Exception as exc:
            if _is_usage_error(exc) and getattr(exc, "ctx", None) is None:
                error: Any = exc
                error.ctx, error.cmd = ctx, ctx.command
            raise


class GuardCommand(_KnowsItsContext, TyperCommand):
    """A `guard` command (`app.command(..., cls=GuardCommand)`)."""


class GuardGroup(_KnowsItsContext, TyperGroup):
    """A command group that reports failures through `exit_code` and suggests commands."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = result if isinstance(result, int) else 0
        except (Exception, KeyboardInterrupt) as exc:
            code = exit_code(exc)
        if standalone_mode:
            sys.exit(code)
        return code

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            # typer would print the whole help (with rich) while raising NoArgsIsHelpError.
            ctx.fail("Missing command.")
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name = args[0] if args else ""
        unknown = name and not name.startswith("-") and self.get_command(ctx, name) is None
        if unknown and not ctx.resilient_parsing:
            ctx.meta[_HINT] = self._suggest(ctx, name)
            ctx.fail(f"unknown command {name!r} for `{ctx.command_path}`")
        return super().resolve_command(ctx, args)

    def _suggest(self, ctx: Any, name: str) -> str:
        path = ctx.command_path
        close = get_close_matches(name, list(self.commands))
        if close:
            return f"did you mean `{path} {close[0]}`?"
        # A sub-command's command typed at this level: `guard status` → `guard dev status`.
        for group_name, group in self.commands.items():
            if name in getattr(group, "commands", {}):
                return f"did you mean `{path} {group_name} {name}`?"
        return f"`{path}` takes one of: {', '.join(self.commands)} (see `{path} --help`)"
