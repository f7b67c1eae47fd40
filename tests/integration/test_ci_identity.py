"""CI workload identity against the running broker: GitHub- and GitLab-shaped tokens.

A demo stack whose broker trusts the dev IdP (people) and two test CI issuers (real HTTP
discovery + JWKS, RS256, tests/fix_ci_issuer.py). A CI job's token reaches the demo
database through `guard exec` only when its bindings match; every known pitfall of CI
OIDC (fork pull requests, other branches, a re-created repository of the same name, a
reusable workflow called from elsewhere, replays, kid reuse by another issuer, kid floods,
platform-default audiences) is a test here, against the broker over HTTP.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fix_ci_issuer import CI_JOB, CIIssuer, ci_policy, github_claims, gitlab_claims
from tests.fix_stack import Stack, stack_with_policy

pytestmark = [pytest.mark.integration, pytest.mark.ci_identity]

AUDIENCE = "https://guard.test"
MASKED_SSN = "***-**-6789"
POLICY = ci_policy()
JOB = CI_JOB
SHARED_WORKFLOW = "octo/shared/.github/workflows/deploy.yml@refs/tags/v2"


def trusted_issuers(github: CIIssuer, gitlab: CIIssuer) -> list[dict]:
    return [
        {
            "name": "github-test",
            "issuer": github.url,
            "audience": AUDIENCE,
            "kind": "workload",
            "platform": "github",
            "name_claims": ["repository"],
            # A fork's pull request, or anything not a push or a manual run, gets nothing.
            "require": {"repository_owner_id": 1001, "event_name": ["push", "workflow_dispatch"]},
            "groups": [
                {
                    "group": "deploy-jobs",
                    "when": {
                        "repository_id": 4242,
                        "ref": "refs/heads/main",
                        "ref_protected": True,
                    },
                },
                {
                    # The shared deploy workflow, only when octo/caller (4343) calls it.
                    "group": "deploy-jobs",
                    "when": {
                        "repository_id": 4343,
                        "job_workflow_ref": "octo/shared/.github/workflows/deploy.yml@refs/tags/v*",
                    },
                },
            ],
        },
        {
            "name": "gitlab-test",
            "issuer": gitlab.url,
            "audience": AUDIENCE,
            "kind": "workload",
            "platform": "gitlab",
            "name_claims": ["project_path"],
            "require": {"namespace_id": 77, "pipeline_source": ["push", "web", "schedule"]},
            "groups": [
                {"group": "deploy-jobs", "when": {"project_id": 5150, "ref_protected": True}}
            ],
        },
    ]


@pytest.fixture(scope="module")
def issuers() -> Iterator[tuple[CIIssuer, CIIssuer]]:
    with CIIssuer("gh-1") as github, CIIssuer("gl-1") as gitlab:
        yield github, gitlab


@pytest.fixture(scope="module")
def ci_stack(
    dev_stack: Stack, issuers: tuple[CIIssuer, CIIssuer], tmp_path_factory
) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("ci-identity")
    extra = home / "trusted-issuers.yaml"
    extra.write_text(yaml.safe_dump(trusted_issuers(*issuers)))
    with stack_with_policy(
        dev_stack, home / "home", POLICY, env={"GUARD_DEV_TRUSTED_ISSUERS": str(extra)}
    ) as stack:
        yield stack


def ci_env(**extra: str) -> dict[str, str]:
    # No login in this GUARD_HOME is used: a CI job has none.
    return {"GUARD_ISSUER": "", **extra}


def github_job_env(github: CIIssuer) -> dict[str, str]:
    """A GitHub Actions job with `id-token: write`: the runner's token service is `github`."""
    return ci_env(
        GITHUB_ACTIONS="true",
        ACTIONS_ID_TOKEN_REQUEST_URL=github.runner_url,
        ACTIONS_ID_TOKEN_REQUEST_TOKEN=github.runner_bearer,
        GUARD_CI_AUDIENCE=AUDIENCE,
    )


def run_job(stack: Stack, tmp_path: Path, env: dict[str, str], *args: str):
    job = tmp_path / "job.py"
    job.write_text(JOB)
    return stack.guard("exec", *args, "demo", "--", sys.executable, str(job), env=env)


def open_with(stack: Stack, token: str) -> httpx.Response:
    """POST /v1/sessions with `token`: the broker's answer (the session ended at once)."""
    response = stack.request_session(token)
    if response.status_code == 201:
        body = response.json()
        stack.end_session(body["session_id"], {"Authorization": f"Bearer {body['session_token']}"})
    return response


def audit_identity(stack: Stack, session_id: str) -> dict:
    for record in stack.audit_records():
        if record.get("session_id") == session_id and record.get("event") == "requested":
            return record["identity"]
    raise AssertionError(f"no requested record for session {session_id}")


# --- GitHub Actions: the token fetched by `guard exec` itself --------------------------------


def test_github_job_fetches_a_fresh_token_per_call_and_reads_masked_data(
    ci_stack: Stack, issuers, tmp_path
):
    github, _ = issuers
    github.runner_claims = github_claims()
    before = len(github.token_requests)
    env = github_job_env(github)
    for _ in range(2):  # the second run gets a new token: single use is no obstacle
        result = run_job(ci_stack, tmp_path, env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == MASKED_SSN
    assert github.token_requests[before:] == [AUDIENCE, AUDIENCE]
    session_id = result.stderr.split("guard: session ", 1)[1].split()[0]
    identity = audit_identity(ci_stack, session_id)
    assert identity["kind"] == "workload"
    assert identity["via"] == "github-test"
    assert identity["issuer"] == github.url
    assert identity["name"] == "octo/app"
    assert identity["groups"] == ["deploy-jobs"]
    claims = identity["claims"]
    assert claims["repository_id"] == "4242"
    assert claims["ref"] == "refs/heads/main"
    assert claims["run_id"] == "987654321"
    assert claims["workflow_ref"].startswith("octo/app/.github/workflows/deploy.yml")


def test_github_job_from_a_fork_pull_request_is_refused_by_guard_exec(
    ci_stack: Stack, issuers, tmp_path
):
    github, _ = issuers
    github.runner_claims = github_claims(
        repository="mallory/app",
        repository_id="666",
        repository_owner="mallory",
        repository_owner_id="666",
        event_name="pull_request_target",
    )
    env = github_job_env(github)
    result = run_job(ci_stack, tmp_path, env)
    assert result.returncode != 0
    assert result.stdout == ""  # the job never ran
    assert "GitHub Actions' ID token service" in result.stderr
    assert "event_name" in result.stderr and "Traceback" not in result.stderr


def test_github_job_status_takes_a_token_per_broker_call(ci_stack: Stack, issuers):
    github, _ = issuers
    github.runner_claims = github_claims()
    before = len(github.token_requests)
    env = github_job_env(github)
    result = ci_stack.guard("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    me = json.loads(result.stdout)
    assert (me["principal"], me["groups"]) == ("octo/app", ["deploy-jobs"])
    assert (me["kind"], me["via"]) == ("workload", "github-test")
    # /v1/me and /v1/sessions: two calls, two single-use tokens (none replayed).
    assert len(github.token_requests) - before == 2
    human = ci_stack.guard("status", env=env)
    assert human.returncode == 0, human.stderr
    assert (
        "CI job octo/app (repo:octo/app:ref:refs/heads/main), admitted by the trusted "
        "issuer github-test" in human.stdout
    )


def test_github_job_without_id_token_permission_is_told_what_to_add(ci_stack: Stack, tmp_path):
    result = run_job(ci_stack, tmp_path, ci_env(GITHUB_ACTIONS="true"))
    assert result.returncode != 0
    assert "cannot ask for an ID token" in result.stderr
    assert "id-token: write" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_replayed_ci_token_is_refused(ci_stack: Stack, issuers, tmp_path):
    github, _ = issuers
    token = github.mint(github_claims(), audience=AUDIENCE)
    env = ci_env(GUARD_ID_TOKEN=token)
    first = run_job(ci_stack, tmp_path, env)
    assert first.returncode == 0, first.stderr
    second = run_job(ci_stack, tmp_path, env)
    assert second.returncode != 0
    assert "GUARD_ID_TOKEN" in second.stderr  # where the refused token came from
    assert "already used" in second.stderr
    assert token not in second.stderr + second.stdout


# --- GitLab CI: the token in the variable the job's `id_tokens:` names ------------------------


def test_gitlab_job_token_from_its_named_variable(ci_stack: Stack, issuers, tmp_path):
    _, gitlab = issuers
    env = ci_env(
        GUARD_ID_TOKEN_VARIABLE="GUARD_GITLAB_TOKEN",
        GUARD_GITLAB_TOKEN=gitlab.mint(gitlab_claims(), audience=AUDIENCE),
    )
    result = run_job(ci_stack, tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == MASKED_SSN
    session_id = result.stderr.split("guard: session ", 1)[1].split()[0]
    identity = audit_identity(ci_stack, session_id)
    assert (identity["via"], identity["name"]) == ("gitlab-test", "group/app")
    assert identity["claims"]["project_id"] == "5150"
    assert identity["claims"]["pipeline_id"] == "3141"


def test_gitlab_merge_request_pipeline_is_refused_by_guard_exec(ci_stack, issuers, tmp_path):
    _, gitlab = issuers
    token = gitlab.mint(gitlab_claims(pipeline_source="merge_request_event"), audience=AUDIENCE)
    env = ci_env(GUARD_ID_TOKEN_VARIABLE="GUARD_GITLAB_TOKEN", GUARD_GITLAB_TOKEN=token)
    result = run_job(ci_stack, tmp_path, env)
    assert result.returncode != 0
    assert "GUARD_GITLAB_TOKEN" in result.stderr
    assert "pipeline_source" in result.stderr
    # The broker's hint for a job, not the CLI's generic one.
    assert "hint: run from the repository, branch and event" in result.stderr
    assert "Traceback" not in result.stderr


# --- bindings that do not match: each a classic CI identity attack ---------------------------


@pytest.mark.parametrize(
    ("claims", "why"),
    [
        # A fork's pull request: other owner, pull_request event.
        (
            github_claims(
                repository="mallory/app",
                repository_id="666",
                repository_owner="mallory",
                repository_owner_id="666",
                event_name="pull_request",
            ),
            "event_name",
        ),
        # The fork's own push (its workflows run in the fork, for its owner).
        (
            github_claims(
                repository="mallory/app",
                repository_id="666",
                repository_owner="mallory",
                repository_owner_id="666",
            ),
            "repository_owner_id",
        ),
        # A pull request from a branch of the repository itself.
        (github_claims(event_name="pull_request", ref="refs/pull/7/merge"), "event_name"),
        # Another branch of the right repository.
        (github_claims(ref="refs/heads/feature", ref_protected="false"), "ref"),
        # The repository was deleted and re-created under the same name: new id.
        (github_claims(repository_id="5555"), "repository_id"),
        # The shared workflow called from another repository of the same owner.
        (
            github_claims(
                repository="octo/other", repository_id="4444", job_workflow_ref=SHARED_WORKFLOW
            ),
            "repository_id",
        ),
        # The right caller, but running another workflow than the shared one.
        (
            github_claims(
                repository="octo/caller",
                repository_id="4343",
                job_workflow_ref="octo/caller/.github/workflows/evil.yml@refs/heads/main",
            ),
            "job_workflow_ref",
        ),
        # A glob never crosses '/': a tag under a deeper path is not `refs/tags/v*`.
        (
            github_claims(
                repository_id="4343",
                job_workflow_ref="octo/shared/.github/workflows/deploy.yml@refs/tags/v2/evil",
            ),
            "job_workflow_ref",
        ),
    ],
    ids=[
        "fork-pull-request",
        "fork-push",
        "own-pull-request",
        "other-branch",
        "recreated-repository",
        "reusable-workflow-from-elsewhere",
        "caller-with-another-workflow",
        "glob-crossing-slash",
    ],
)
def test_github_token_with_unmatched_bindings_is_refused(ci_stack, issuers, claims, why):
    github, _ = issuers
    response = open_with(ci_stack, github.mint(claims, audience=AUDIENCE))
    assert response.status_code == 401, response.text
    assert why in response.json()["message"]


def test_reusable_workflow_from_its_bound_caller_is_admitted(ci_stack, issuers):
    github, _ = issuers
    claims = github_claims(
        repository="octo/caller",
        repository_id="4343",
        workflow_ref="octo/caller/.github/workflows/release.yml@refs/heads/main",
        job_workflow_ref=SHARED_WORKFLOW,
    )
    response = open_with(ci_stack, github.mint(claims, audience=AUDIENCE))
    assert response.status_code == 201, response.text


def test_sub_is_never_read_by_position(ci_stack, issuers):
    """An environment or a custom subject template changes `sub`'s shape; admission rests
    on the id claims, so both shapes are admitted alike, and a look-alike `sub` from
    another repository id is not."""
    github, _ = issuers
    for sub in (
        "repo:octo/app:environment:production",
        "repo:octo@1001/app@4242:ref:refs/heads/main",
    ):
        response = open_with(ci_stack, github.mint(github_claims(sub=sub), audience=AUDIENCE))
        assert response.status_code == 201, response.text
    forged = github_claims(repository_id="9", sub="repo:octo/app:ref:refs/heads/main")
    assert open_with(ci_stack, github.mint(forged, audience=AUDIENCE)).status_code == 401


# --- token attacks -----------------------------------------------------------------------------


def test_untrusted_issuer_reusing_a_trusted_kid_is_refused(ci_stack, issuers):
    github, _ = issuers
    with CIIssuer(kid=github.kid) as mallory:
        # Its own iss: not trusted, refused without fetching anything from anyone.
        fetches = github.jwks_fetches
        own = open_with(ci_stack, mallory.mint(github_claims(), audience=AUDIENCE))
        assert own.status_code == 401
        assert "does not trust" in own.json()["message"]
        assert mallory.jwks_fetches == 0
        # The trusted iss and kid, but signed with its own key: the trusted JWKS decides.
        forged = mallory.mint(github_claims(), audience=AUDIENCE, issuer=github.url)
        response = open_with(ci_stack, forged)
        assert response.status_code == 401
        assert "signature" in response.json()["message"]
        assert github.jwks_fetches - fetches <= 1


def test_a_flood_of_unknown_kids_makes_at_most_one_jwks_fetch(ci_stack, issuers):
    _, gitlab = issuers
    open_with(ci_stack, gitlab.mint(gitlab_claims(), audience=AUDIENCE))  # keys cached
    fetches = gitlab.jwks_fetches
    for _ in range(20):
        token = gitlab.mint(gitlab_claims(), audience=AUDIENCE, kid=secrets.token_hex(4))
        response = open_with(ci_stack, token)
        assert response.status_code in (401, 503), response.text
    # One refetch at most within the cooldown (30 s), whatever the number of bad kids.
    assert gitlab.jwks_fetches - fetches <= 1


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict, body: dict, key: bytes | None) -> str:
    """A compact JWS by hand: `none` (no signature) or HS256 keyed with `key`."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(body).encode())}"
    if key is None:
        return signing_input + "."
    mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def _classic_attacks(github: CIIssuer) -> dict[str, tuple[str, str]]:
    public_pem = github.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    body = {
        **github_claims(),
        "iss": github.url,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
        "jti": secrets.token_hex(8),
    }
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "alg-none": (_forge({"alg": "none", "kid": github.kid}, body, None), "algorithm"),
        "hs256-with-public-key": (
            _forge({"alg": "HS256", "kid": github.kid}, body, public_pem),
            "algorithm",
        ),
        "expired": (github.mint(github_claims(), audience=AUDIENCE, lifetime=-120), "expired"),
        "platform-default-audience": (
            github.mint(github_claims(), audience="https://github.com/octo"),
            "audience",
        ),
        "two-audiences": (github.mint(github_claims(), audience=[AUDIENCE, "other"]), "audience"),
        "no-jti": (github.mint(github_claims(), audience=AUDIENCE, jti=False), "jti"),
        "other-key-same-kid": (
            github.mint(github_claims(), audience=AUDIENCE, key=other_key),
            "signature",
        ),
    }


@pytest.mark.parametrize(
    "attack",
    [
        "alg-none",
        "hs256-with-public-key",
        "expired",
        "platform-default-audience",
        "two-audiences",
        "no-jti",
        "other-key-same-kid",
    ],
)
def test_classic_token_attacks_are_refused(ci_stack, issuers, attack):
    github, _ = issuers
    token, why = _classic_attacks(github)[attack]
    response = open_with(ci_stack, token)
    assert response.status_code == 401, response.text
    assert why in response.json()["message"]


def test_people_still_log_in_beside_the_ci_issuers(ci_stack: Stack):
    token = ci_stack.guard("dev", "token", "alice")
    assert token.returncode == 0, token.stderr
    response = open_with(ci_stack, token.stdout.strip())
    assert response.status_code == 201, response.text
    identity = audit_identity(ci_stack, response.json()["session_id"])
    assert (identity["kind"], identity["via"], identity["name"]) == ("person", "oidc", "alice")
