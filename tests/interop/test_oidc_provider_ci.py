"""Claim bindings with CI tokens minted by an independent OpenID provider (oidc-provider).

tests/integration/test_ci_identity.py proves the bindings with tokens guard's own test
issuer signs (tests/fix_ci_issuer.py); here the issuer is panva's oidc-provider on Node
(tests/fix_node_idp.py), playing a GitHub Actions token service: its CI accounts' ID
tokens carry a job's claims (repository, repository_id, ref, event_name…), `aud` its CI
client and a new `jti` each, signed with its own key and served from its own discovery
and JWKS. A demo stack whose broker trusts it as a `workload` issuer lets the main
branch's push job read the demo database (masked) through `guard exec`, and refuses a
fork, another branch and a pull request, a token used twice, and a person's ID token of
the same provider (another client, another audience). Tokens are never shown.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.fix_ci_issuer import CI_JOB, ci_policy
from tests.fix_node_idp import CI_ACCOUNTS, NodeIdP, node_idp  # noqa: F401
from tests.fix_stack import Stack, stack_with_policy

pytestmark = pytest.mark.ci_identity

MASKED_SSN = "***-**-6789"  # customer 1 of the demo data (raw 123-45-6789)
POLICY = ci_policy()
JOB = CI_JOB


def trusted_issuer(idp: NodeIdP) -> dict:
    """The broker's entry for the Node provider as a GitHub-shaped CI issuer: octo's
    (owner id 1001) pushes only; deploy-jobs for octo/app (4242)'s protected main."""
    return {
        "name": "node-ci",
        "issuer": idp.issuer,
        "audience": idp.ci_client_id,
        "kind": "workload",
        "platform": "github",
        "name_claims": ["repository"],
        "require": {"repository_owner_id": "1001", "event_name": ["push"]},
        "groups": [
            {
                "group": "deploy-jobs",
                "when": {
                    "repository_id": "4242",
                    "ref": "refs/heads/main",
                    "ref_protected": "true",
                },
            }
        ],
    }


@pytest.fixture(scope="module")
def ci_stack(
    dev_stack: Stack,
    node_idp: NodeIdP,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("node-ci-stack")
    issuers = work / "trusted-issuers.yaml"
    issuers.write_text(yaml.safe_dump([trusted_issuer(node_idp)]))
    env = {"GUARD_DEV_TRUSTED_ISSUERS": str(issuers)}
    with stack_with_policy(dev_stack, work / "home", POLICY, env=env) as stack:
        yield stack


def run_job(stack: Stack, tmp_path: Path, token: str):
    """`guard exec demo -- python job.py` as a CI job whose token is GUARD_ID_TOKEN (no
    login in this GUARD_HOME is used: a CI job has none)."""
    job = tmp_path / "job.py"
    job.write_text(JOB)
    env = {"GUARD_ISSUER": "", "GUARD_ID_TOKEN": token}
    return stack.guard("exec", "demo", "--", sys.executable, str(job), env=env)


def audit_identity(stack: Stack, session_id: str) -> dict:
    for record in stack.audit_records():
        if record.get("session_id") == session_id and record.get("event") == "requested":
            return record["identity"]
    raise AssertionError(f"no requested record for session {session_id}")


def test_main_branch_push_job_reads_masked_data(
    ci_stack: Stack,
    node_idp: NodeIdP,  # noqa: F811
    tmp_path: Path,
) -> None:
    result = run_job(ci_stack, tmp_path, node_idp.ci_token("ci-main"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == MASKED_SSN
    session_id = result.stderr.split("guard: session ", 1)[1].split()[0]
    identity = audit_identity(ci_stack, session_id)
    assert (identity["kind"], identity["via"]) == ("workload", "node-ci")
    assert identity["issuer"] == node_idp.issuer
    assert identity["name"] == "octo/app"
    assert identity["groups"] == ["deploy-jobs"]
    claims = identity["claims"]
    assert claims["repository_id"] == "4242"
    assert claims["ref"] == "refs/heads/main"
    assert claims["run_id"] == CI_ACCOUNTS["ci-main"]["run_id"]
    assert claims["job_workflow_ref"] == CI_ACCOUNTS["ci-main"]["job_workflow_ref"]


@pytest.mark.parametrize(
    ("account", "claim"),
    [
        ("ci-fork", "event_name"),  # a fork's pull request
        ("ci-fork-push", "repository_owner_id"),  # the fork's own push
        ("ci-branch", "ref"),  # another branch of octo/app: admitted, but no group
        ("ci-pull-request", "event_name"),  # a pull request from octo/app's own branch
    ],
)
def test_jobs_the_bindings_do_not_match_are_refused(
    ci_stack: Stack,
    node_idp: NodeIdP,  # noqa: F811
    tmp_path: Path,
    account: str,
    claim: str,
) -> None:
    token = node_idp.ci_token(account)
    result = run_job(ci_stack, tmp_path, token)
    assert result.returncode != 0
    assert result.stdout == ""  # the job never ran
    assert "GUARD_ID_TOKEN" in result.stderr  # where the refused token came from
    assert "node-ci" in result.stderr
    assert repr(claim) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert token not in result.stderr


def test_a_token_used_twice_is_refused_the_second_time(
    ci_stack: Stack,
    node_idp: NodeIdP,  # noqa: F811
    tmp_path: Path,
) -> None:
    token = node_idp.ci_token("ci-main")
    first = run_job(ci_stack, tmp_path, token)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == MASKED_SSN
    second = run_job(ci_stack, tmp_path, token)
    assert second.returncode != 0
    assert second.stdout == ""
    assert "GUARD_ID_TOKEN" in second.stderr
    assert "already used" in second.stderr
    assert token not in second.stderr + second.stdout
    # A new token of the same job (its own jti) is admitted again.
    third = run_job(ci_stack, tmp_path, node_idp.ci_token("ci-main"))
    assert third.returncode == 0, third.stderr


def test_a_persons_token_of_the_same_provider_is_refused(
    ci_stack: Stack,
    node_idp: NodeIdP,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Same issuer and key, but alice's login at guard-cli: its `aud` is not the CI
    client's, so this workload entry does not take it (no person entry for the issuer)."""
    token = node_idp.device_tokens(node_idp.client_id, "openid groups", "alice")["id_token"]
    result = run_job(ci_stack, tmp_path, token)
    assert result.returncode != 0
    assert result.stdout == ""
    assert "audience" in result.stderr, result.stderr
    assert token not in result.stderr
