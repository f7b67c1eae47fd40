"""pgjdbc from Java through the real gateway: Debian's libpostgresql-jdbc-java (installed by
scripts/bootstrap) or a pgjdbc 42.7 in the local Maven repository. Without a JVM or a jar it
skips, except under CI=true, where that is a failure."""

from __future__ import annotations

import glob
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.fix_pg import require
from tests.fix_stack import Stack
from tests.integration.test_gateway import session  # noqa: F401 - module-scoped fixture

pytestmark = pytest.mark.integration
SOURCE = Path(__file__).resolve().parent / "java" / "GuardCompat.java"


DEBIAN_JAR = Path("/usr/share/java/postgresql.jar")


def _jar() -> str | None:
    found = sorted(
        glob.glob(
            str(Path.home() / ".m2/repository/org/postgresql/postgresql/42.7*/postgresql-42.7*.jar")
        )
    )
    if found:
        return found[-1]
    return str(DEBIAN_JAR) if DEBIAN_JAR.exists() else None


def test_pgjdbc_prepared_binary_and_refusal(dev_stack: Stack, session, tmp_path):  # noqa: F811
    jar = _jar()
    require(
        "a JVM",
        shutil.which("javac") is not None and shutil.which("java") is not None,
        "install a JDK (Java 17)",
    )
    require(
        "pgjdbc", jar is not None, "apt-get install libpostgresql-jdbc-java (scripts/bootstrap)"
    )
    assert jar is not None
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
