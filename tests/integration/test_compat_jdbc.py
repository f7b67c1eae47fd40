"""pgjdbc 42.7 from Java through the real gateway (skipped where there is no JVM or jar)."""

from __future__ import annotations

import glob
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.fix_stack import Stack
from tests.integration.test_gateway import session  # noqa: F401 - module-scoped fixture

pytestmark = pytest.mark.integration
SOURCE = Path(__file__).resolve().parent / "java" / "GuardCompat.java"


def _jar() -> str | None:
    found = sorted(
        glob.glob(
            str(Path.home() / ".m2/repository/org/postgresql/postgresql/42.7*/postgresql-42.7*.jar")
        )
    )
    return found[-1] if found else None


def test_pgjdbc_prepared_binary_and_refusal(dev_stack: Stack, session, tmp_path):  # noqa: F811
    jar = _jar()
    if shutil.which("javac") is None or shutil.which("java") is None or jar is None:
        pytest.skip("no JVM or no pgjdbc 42.7 jar in the local Maven repository")
    subprocess.run(["javac", "-d", str(tmp_path), str(SOURCE)], check=True, timeout=120)
    url = (
        f"jdbc:postgresql://{session['gateway_host']}:{session['gateway_port']}/"
        f"{session['database']}?sslmode=verify-full&sslrootcert={quote(dev_stack.status['gateway_ca'])}"
        "&prepareThreshold=3"
    )
    out = subprocess.run(
        [
            "java",
            "-cp",
            f"{tmp_path}:{jar}",
            "GuardCompat",
            url,
            session["user"],
            session["password"],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = dict(line.split("=", 1) for line in out.stdout.split() if "=" in line)
    assert lines["ssn"] == "***-**-6789"
    count, total = dev_stack.direct("SELECT count(*), sum(rate) FROM products WHERE id <= 5")[0]
    assert int(lines["products"]) == count and lines["rate"] == str(total)
    assert lines["refused"] == "42501"
    assert lines["after"] == "42"
