"""Running `guard` in tests: through `click.testing.CliRunner` and through `main()`.

`guard` (the fixture) runs a command line three ways: CliRunner exercises the app as
registered at import (standalone mode, SystemExit), `main()` the click application's own
entry (an int exit code), and `entry.main()` what the installed script runs (its fast path
for `guard exec`, else `main()`). Exceptions are not caught: a bug fails the test with its
traceback instead of becoming exit code 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from guard.cli import entry
from guard.cli.main import app, main


@dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    err: str


Guard = Callable[..., Outcome]


def via_runner(*args: str) -> Outcome:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return Outcome(result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty GUARD_HOME: nothing a test runs can touch the real ~/.guard."""
    monkeypatch.setenv("GUARD_HOME", str(tmp_path))
    monkeypatch.setenv("GUARD_KEYRING", "file")
    for var in ("GUARD_ID_TOKEN", "GUARD_ISSUER", "GUARD_BROKER_URL"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.fixture(params=["CliRunner", "main", "script"])
def guard(request, capsys, monkeypatch) -> Guard:
    def via_main(*args: str) -> Outcome:
        code = main(list(args))
        out, err = capsys.readouterr()
        return Outcome(code, out, err)

    def via_script(*args: str) -> Outcome:
        # What the installed `guard` script runs: `cli.entry.main`, which takes `guard
        # exec`'s everyday command lines itself and hands the rest to click.
        monkeypatch.setattr(sys, "argv", ["guard", *args])
        with pytest.raises(SystemExit) as exited:
            entry.main()
        out, err = capsys.readouterr()
        code = exited.value.code
        return Outcome(code if isinstance(code, int) else 0 if code is None else 1, out, err)

    return {"CliRunner": via_runner, "main": via_main, "script": via_script}[request.param]
