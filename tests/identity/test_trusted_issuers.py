"""Trusted issuers: claim bindings, group mappings, routing by `iss`, and the config rules
that keep CI workload identity safe (issue 15). Pure parts and real RS256 tokens; the
running-broker versions are in tests/integration/test_ci_identity.py."""

from __future__ import annotations

import secrets
import time
import warnings

import jwt
import pydantic
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from guard.broker.identity.bindings import ClaimPattern, binding_problems, claim_text
from guard.broker.identity.oidc import AuthenticationError, StaticKeySource, TrustedIssuers
from guard.broker.settings import BrokerSettings, TrustedIssuerSettings
from tests.fix_ci_issuer import github_claims, gitlab_claims

pytestmark = pytest.mark.ci_identity

GITHUB = "https://token.actions.githubusercontent.com"
AUDIENCE = "https://guard.bank.example"


# --- patterns -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [
        ("refs/heads/main", "refs/heads/main", True),
        ("refs/heads/main", "refs/heads/mainx", False),
        ("refs/heads/*", "refs/heads/release", True),
        ("refs/heads/*", "refs/heads/release/1.0", False),  # never crosses '/'
        ("refs/tags/v?", "refs/tags/v2", True),
        ("refs/tags/v?", "refs/tags/v/", False),
        ("repo:octo/app:*", "repo:octo/app:ref", True),
        ("repo:octo/app:*", "repo:octo/app:environment:prod", False),  # never crosses ':'
        ("octo/*", "octo/app", True),
        ("a.b", "aXb", False),  # '.' is literal, not a regex
        ("[ab]", "a", False),  # no character classes
        ("*", "", True),
    ],
)
def test_glob_never_crosses_slash_or_colon(pattern, value, matches):
    assert ClaimPattern.of("c", [pattern]).matches({"c": value}) is matches


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("x", "x"),
        (42, "42"),
        (True, "true"),
        (False, "false"),
        ([1], None),
        ({}, None),
        (None, None),
    ],
)
def test_claims_compare_as_strings_and_lists_match_nothing(value, text):
    assert claim_text(value) == text


def test_a_list_claim_cannot_satisfy_a_binding():
    # ["4242", "666"] must not pass as repository_id 4242.
    assert not ClaimPattern.of("repository_id", ["4242"]).matches({"repository_id": ["4242"]})


# --- configuration rules ----------------------------------------------------------------------


def workload(**kw) -> TrustedIssuerSettings:
    base = {"name": "gh", "issuer": GITHUB, "audience": AUDIENCE, "kind": "workload"}
    return TrustedIssuerSettings(**{**base, **kw})


def refusal(**kw) -> str:
    with pytest.raises(pydantic.ValidationError) as info:
        workload(**kw)
    return str(info.value)


def test_platform_default_audiences_are_refused():
    assert "platform default" in refusal(audience="https://github.com/octo")
    assert "platform default" in refusal(audience="https://github.com")
    gitlab = "https://gitlab.example.com"
    assert "platform default" in refusal(issuer=gitlab, audience=gitlab + "/")


def test_a_name_claim_must_come_with_its_numeric_id():
    message = refusal(groups=[{"group": "g", "when": {"repository": "octo/app"}}])
    assert "'repository_id'" in message
    message = refusal(
        issuer="https://gitlab.com",
        groups=[{"group": "g", "when": {"project_path": "group/app", "namespace_id": 7}}],
    )
    assert "'project_id'" in message
    assert "binds 'sub' without a numeric id" in refusal(
        issuer="https://ci.example", groups=[{"group": "g", "when": {"sub": "repo:octo/app:*"}}]
    )


def test_every_github_mapping_is_bound_to_an_owner_or_repository_id():
    assert "repository_owner_id" in refusal(groups=[{"group": "g", "when": {"ref": "main"}}])
    assert "repository_owner_id" in refusal(require={"event_name": "push"})
    ok = workload(
        require={"repository_owner_id": 1001},
        groups=[{"group": "g", "when": {"ref": "refs/heads/main"}}],
    )
    assert ok.resolved_platform() == "github" and ok.is_single_use()


def test_generic_workload_issuer_needs_some_binding():
    assert "binds no claim" in refusal(issuer="https://ci.example", groups=[])
    assert binding_problems("generic", {"team": "x"}, []) == []


def test_yaml_numbers_and_booleans_become_the_strings_claims_compare_as():
    issuer = workload(groups=[{"group": "g", "when": {"repository_id": 42, "ref_protected": True}}])
    assert issuer.groups[0].when == {"repository_id": "42", "ref_protected": "true"}


def test_issuer_must_be_https_except_on_loopback():
    assert "https" in refusal(issuer="http://ci.example")
    assert workload(issuer="http://127.0.0.1:9", platform="github", require={"repository_id": 1})


def base_config(**kw) -> dict:
    return {
        "state_dir": "/tmp/x",
        "policy_file": "/tmp/p.yaml",
        "openbao": {"addr": "http://127.0.0.1:8200"},
        "targets": {},
        "audit": {"path": "/tmp/a.jsonl"},
        **kw,
    }


def test_broker_needs_an_issuer_and_unique_ones():
    with pytest.raises(pydantic.ValidationError, match="no identity provider"):
        BrokerSettings.model_validate(base_config())
    people = {"issuer": "https://idp.example"}
    twice = [{"name": "x", "issuer": "https://idp.example", "audience": "a"}]
    with pytest.raises(pydantic.ValidationError, match="appears twice"):
        BrokerSettings.model_validate(base_config(oidc=people, trusted_issuers=twice))
    settings = BrokerSettings.model_validate(base_config(oidc=people))
    (only,) = settings.issuers()
    assert (only.name, only.kind, only.token_groups_claim()) == ("oidc", "person", "groups")
    assert not only.is_single_use()  # the CLI reuses a person's ID token until it expires


# --- routing and principals (real RS256, keys given directly) ---------------------------------


class Minter:
    def __init__(self, issuer: str, kid: str = "k1") -> None:
        self.issuer, self.kid = issuer, kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self) -> jwt.PyJWK:
        data = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return jwt.PyJWK({**data, "kid": self.kid, "alg": "RS256"})

    def mint(self, claims: dict, audience=AUDIENCE, **extra) -> str:
        now = int(time.time())
        body = {"iss": self.issuer, "aud": audience, "iat": now, "exp": now + 300}
        body |= {"jti": secrets.token_hex(8), **claims, **extra}
        return jwt.encode(body, self.key, "RS256", headers={"kid": self.kid})


@pytest.fixture
def github():
    return Minter("https://127.0.0.1:1/gh")


@pytest.fixture
def gitlab():
    return Minter("https://127.0.0.1:2/gl")


@pytest.fixture
def people():
    return Minter("https://idp.example")


@pytest.fixture
def trusted(github, gitlab, people) -> TrustedIssuers:
    settings = [
        TrustedIssuerSettings(name="oidc", issuer=people.issuer, audience="guard-cli"),
        TrustedIssuerSettings(
            name="gh",
            issuer=github.issuer,
            audience=AUDIENCE,
            kind="workload",
            platform="github",
            name_claims=("repository",),
            require={"repository_owner_id": "1001"},
            groups=[
                {
                    "group": "deploy-jobs",
                    "when": {"repository_id": "4242", "ref": "refs/heads/main"},
                },
                {"group": "readers", "when": {"repository_id": "4242"}},
            ],
        ),
        TrustedIssuerSettings(
            name="gl",
            issuer=gitlab.issuer,
            audience=AUDIENCE,
            kind="workload",
            platform="gitlab",
            groups=[{"group": "deploy-jobs", "when": {"project_id": "5150"}}],
        ),
    ]
    keys = {people.issuer: people, github.issuer: github, gitlab.issuer: gitlab}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # StaticKeySource warns: unit tests only
        return TrustedIssuers.from_settings(
            settings, lambda s: StaticKeySource({keys[s.issuer].kid: keys[s.issuer].jwk()})
        )


def test_ci_token_becomes_a_workload_principal_with_mapped_groups(trusted, github):
    principal = trusted.principal(github.mint(github_claims()))
    assert principal.groups == {"deploy-jobs", "readers"}
    assert (principal.kind, principal.via, principal.label) == ("workload", "gh", "octo/app")
    assert principal.subject == "repo:octo/app:ref:refs/heads/main"
    evidence = dict(principal.evidence)
    assert evidence["repository_id"] == "4242" and evidence["run_id"] == "987654321"
    feature = trusted.principal(github.mint(github_claims(ref="refs/heads/feature")))
    assert feature.groups == {"readers"}


def test_ci_token_matching_no_mapping_says_what_each_wanted(trusted, gitlab):
    with pytest.raises(AuthenticationError) as info:
        trusted.principal(gitlab.mint(gitlab_claims(project_id="9")))
    assert info.value.reason == "bindings"
    assert "groups[0] (deploy-jobs): its 'project_id' is '9', required '5150'" in str(info.value)


def test_people_keep_their_idp_groups(trusted, people):
    token = people.mint(
        {"sub": "u1", "groups": ["engineers"], "email": "a@b"}, audience="guard-cli"
    )
    principal = trusted.principal(token)
    assert (principal.kind, principal.groups, principal.label) == ("person", {"engineers"}, "a@b")
    assert trusted.principal(token) == principal  # a person's token may be reused


def test_ci_token_is_single_use_per_issuer(trusted, github, gitlab):
    token = github.mint(github_claims(), jti="same")
    trusted.principal(token)
    with pytest.raises(AuthenticationError, match="already used"):
        trusted.principal(token)
    # Another issuer's jti space is its own.
    trusted.principal(gitlab.mint(gitlab_claims(), jti="same"))


def test_a_ci_token_must_not_claim_groups_or_be_for_two_audiences(trusted, github):
    # A groups claim in a CI token means nothing: only mappings give groups.
    principal = trusted.principal(github.mint(github_claims(groups=["security-leads"])))
    assert "security-leads" not in principal.groups
    with pytest.raises(AuthenticationError, match="exactly one"):
        trusted.principal(github.mint(github_claims(), audience=[AUDIENCE, "x"]))


def test_unknown_issuer_is_refused_by_name(trusted):
    stranger = Minter("https://evil.example")
    with pytest.raises(AuthenticationError, match="does not trust") as info:
        trusted.principal(stranger.mint(github_claims()))
    assert info.value.reason == "issuer"
    with pytest.raises(AuthenticationError, match="malformed"):
        trusted.principal("not-a-jwt")


def test_the_readme_ci_example_is_a_valid_broker_config():
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### CI jobs", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert block is not None
    data = yaml.safe_load(block.group(1))
    settings = BrokerSettings.model_validate(base_config(**data))
    names = [(i.name, i.kind, i.resolved_platform()) for i in settings.issuers()]
    assert names == [
        ("oidc", "person", "generic"),
        ("github", "workload", "github"),
        ("gitlab", "workload", "gitlab"),
    ]
