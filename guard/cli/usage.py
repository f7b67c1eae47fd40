"""Every way a `guard` command line ends, as one exit code and at most `error:`/`hint:` lines.

`GuardGroup` (the class of every `guard` command group) runs `exit_code` for the `guard`
script and `click.testing.CliRunner` alike, so a usage error never shows a traceback: it is
one line saying what is wrong and a hint saying what to type instead (exit 2). Every command
is a `GuardCommand` (a group's `command()` makes one), so the hint can show that command's
usage. Imports only the stdlib, click and `cli.errors`: it runs before any command does.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click
from click.exceptions import Exit, NoArgsIsHelpError

from guard.cli.errors import EXIT_INTERRUPTED, EXIT_USAGE, CliError, outcome

__all__ = ["EXIT_INTERRUPTED", "GuardCommand", "GuardGroup", "exit_code", "usage_error"]
_HINT = "guard.usage_hint"  # a hint for the usage error being raised, kept in ctx.meta


def exit_code(exc: BaseException) -> int:
    """Report `exc` on stderr as the user should see it; the exit code. Re-raises what is
    not a CLI outcome (a bug keeps its traceback)."""
    if isinstance(exc, CliError | KeyboardInterrupt):
        return outcome(exc)
    if isinstance(exc, click.Abort):
        return EXIT_INTERRUPTED
    if isinstance(exc, Exit):
        return int(exc.exit_code)
    if isinstance(exc, click.UsageError):
        return exit_code(usage_error(exc))
    if isinstance(exc, click.ClickException):
        return exit_code(CliError(_sentence(exc.format_message()), exit_code=exc.exit_code))
    raise exc


def usage_error(exc: click.UsageError) -> CliError:
    """A click `UsageError` as a one-line `CliError` with a hint."""
    ctx = exc.ctx
    if ctx is None:
        return CliError(
            _sentence(exc.format_message()), hint="see `guard --help`", exit_code=EXIT_USAGE
        )
    path = ctx.command_path
    nothing_given = isinstance(exc, NoArgsIsHelpError)  # its message is the whole help
    group = ctx.command if isinstance(ctx.command, click.Group) else None
    commands = group.list_commands(ctx) if group is not None else None
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


def _sentence(text: str) -> str:
    """click's message as one line in `gh`'s style: lower-case start, no final period."""
    line = next((part.strip() for part in text.splitlines() if part.strip()), "usage error")
    line = line.removesuffix(".")
    return line[:1].lower() + line[1:]


class _GuardBase(click.Command):
    """What every `guard` command and group does differently from click's."""

    def get_short_help_str(self, limit: int = 45) -> str:
        # The help's first line, whole: a group's list wraps it rather than cutting it to
        # the terminal's width ("… ends the session when psql...").
        return (self.short_help or self.help or "").strip().partition("\n")[0]

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            # click's parser raises some usage errors without the context (`--db` given no
            # value); attach it, so the report can name the command and show its usage.
            if exc.ctx is None:
                exc.ctx = ctx  # all `usage_error` reads (`exc.cmd` is final)
            raise


class GuardCommand(_GuardBase):
    """A `guard` command (what `GuardGroup.command()` makes)."""


class GuardGroup(_GuardBase, click.Group):
    """A command group that reports failures through `exit_code` and suggests commands."""

    command_class = GuardCommand
    group_class = type  # `group.group()` makes another GuardGroup

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        """`lazy` names commands by "module:attribute", imported when first looked up:
        `guard exec` imports `cli.commands.exec` alone, not every command's module."""
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})
        self._lazy_order = list(self.lazy)  # their place in help, loaded or not

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy.pop(cmd_name, None)
        if target is not None:
            from importlib import import_module

            module, _, attribute = target.partition(":")
            self.add_command(getattr(import_module(module), attribute), cmd_name)
        return super().get_command(ctx, cmd_name)

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

    def list_commands(self, ctx: click.Context) -> list[str]:
        # In the order registered (help, hints), not sorted; lazy ones in their own order
        # (loaded or not), after the others.
        eager = [name for name in self.commands if name not in self._lazy_order]
        return [*eager, *self._lazy_order]

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            # click would raise NoArgsIsHelpError, its message the whole help.
            ctx.fail("Missing command.")
        return super().parse_args(ctx, args)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0] if args else ""
        unknown = name and not name.startswith("-") and self.get_command(ctx, name) is None
        if unknown and not ctx.resilient_parsing:
            ctx.meta[_HINT] = self._suggest(ctx, name)
            ctx.fail(f"unknown command {name!r} for `{ctx.command_path}`")
        return super().resolve_command(ctx, args)

    def _suggest(self, ctx: click.Context, name: str) -> str:
        from difflib import get_close_matches  # only a mistyped command pays for it

        path = ctx.command_path
        names = self.list_commands(ctx)
        close = get_close_matches(name, names)
        if close:
            return f"did you mean `{path} {close[0]}`?"
        # A sub-command's command typed at this level: `guard status` → `guard dev status`.
        for group_name in names:
            group = self.get_command(ctx, group_name)
            if isinstance(group, click.Group) and name in group.list_commands(ctx):
                return f"did you mean `{path} {group_name} {name}`?"
        return f"`{path}` takes one of: {', '.join(names)} (see `{path} --help`)"
