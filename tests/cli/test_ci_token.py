"""Where a CI job's ID token comes from (issue 15): GitHub Actions' token service, asked
afresh on every call for guard's audience; a GitLab `id_tokens` variable named in the
profile; errors that name the source and say what to do."""

from __future__ import annotations

import pytest

from guard.cli.auth import current_id_token, token_source
from guard.cli.errors import CliError
from guard.cli.profile import Profile
from tests.fix_ci_issuer import CIIssuer, github_claims

pytestmark = pytest.mark.ci_identity

BROKER = "https://guard.bank.example:8400"


@pytest.fixture
def runner(monkeypatch):
    for name in ("GUARD_ID_TOKEN", "GUARD_ID_TOKEN_VARIABLE", "GITHUB_ACTIONS"):
        monkeypatch.delenv(name, raising=False)
    with CIIssuer() as issuer:
        issuer.runner_claims = github_claims()
        monkeypatch.setenv("GITHUB_ACTIONS", "true")
        monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_URL", issuer.runner_url)
        monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_TOKEN", issuer.runner_bearer)
        yield issuer


def test_github_token_is_fetched_fresh_for_the_broker_audience(runner):
    profile = Profile(broker_url=BROKER)
    first, second = current_id_token(profile), current_id_token(profile)
    assert first != second  # never cached: each broker call gets its own (jti)
    assert runner.token_requests == [BROKER, BROKER]  # default audience: the broker URL
    current_id_token(Profile(broker_url=BROKER, ci_audience="guard-prod"))
    assert runner.token_requests[-1] == "guard-prod"
    assert token_source(profile=profile).startswith("GitHub Actions")


def test_github_job_without_the_permission_is_told_to_add_it(runner, monkeypatch):
    monkeypatch.delenv("ACTIONS_ID_TOKEN_REQUEST_TOKEN")
    with pytest.raises(CliError) as info:
        current_id_token(Profile(broker_url=BROKER))
    assert "id-token: write" in (info.value.hint or "")


def test_a_refusing_token_service_is_one_line_without_the_bearer(runner, monkeypatch):
    monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "wrong-bearer-value")
    with pytest.raises(CliError) as info:
        current_id_token(Profile(broker_url=BROKER))
    assert "HTTP 401" in info.value.message
    assert "wrong-bearer-value" not in info.value.message + (info.value.hint or "")


def test_an_unreachable_token_service_says_so(runner, monkeypatch):
    monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_URL", "http://127.0.0.1:9/token?x=1")
    with pytest.raises(CliError, match="cannot reach GitHub Actions"):
        current_id_token(Profile(broker_url=BROKER))


def test_an_explicit_token_wins_over_the_token_service(runner, monkeypatch):
    monkeypatch.setenv("GUARD_ID_TOKEN", "given")
    assert current_id_token(Profile(broker_url=BROKER)) == "given"
    assert runner.token_requests == []
    assert token_source(profile=Profile(broker_url=BROKER)) == "GUARD_ID_TOKEN"


def test_gitlab_token_from_the_variable_the_profile_names(monkeypatch):
    for name in ("GUARD_ID_TOKEN", "GITHUB_ACTIONS", "GUARD_ID_TOKEN_VARIABLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GUARD_DB_TOKEN", "from-gitlab")
    profile = Profile(broker_url=BROKER, id_token_variable="GUARD_DB_TOKEN")
    assert current_id_token(profile) == "from-gitlab"
    assert token_source(profile=profile) == "GUARD_DB_TOKEN"
    monkeypatch.delenv("GUARD_DB_TOKEN")
    with pytest.raises(CliError) as info:
        current_id_token(profile)
    assert "GUARD_DB_TOKEN" in (info.value.hint or "")
