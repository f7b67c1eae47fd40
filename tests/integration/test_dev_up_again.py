"""`guard dev up` again on the real, running demo stack (the shared `dev_stack` fixture):
it reports that stack and succeeds, and starts or stops nothing."""

from __future__ import annotations

import json


def test_up_again_reports_the_running_stack_and_leaves_it_be(dev_stack):
    before = json.loads(dev_stack.guard("dev", "status", "--json").stdout)

    again = dev_stack.guard("dev", "up", "--detach")

    assert again.returncode == 0, again.stderr
    assert again.stderr.startswith("the dev stack was already up (in ")
    assert "error:" not in again.stderr and "Traceback" not in again.stderr
    assert "next: " in again.stderr.splitlines()[-1]
    assert before["broker_url"] in again.stdout and before["gateway"] in again.stdout
    after = dev_stack.guard("dev", "status", "--json")
    assert after.returncode == 0
    assert json.loads(after.stdout) == before  # same processes, ports and record
    health = dev_stack.api("GET", "/v1/health")
    assert health.status_code == 200
