"""A test OIDC issuer that mints CI-shaped tokens (GitHub Actions, GitLab), over real HTTP.

Serves discovery and a JWKS on 127.0.0.1 from a thread, signs RS256 tokens with its own
key, and counts JWKS fetches (what a `kid` flood would make the broker do). It can also
play a GitHub Actions runner's ID-token service (`ACTIONS_ID_TOKEN_REQUEST_URL`): bearer
checked, `audience` from the query, a fresh token (new `jti`) per request, requests
counted. Tokens are never printed.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa


# The demo policy with the CI jobs' group, `deploy-jobs`, allowed to connect and read, in
# the policy like any person's group; and a job that prints customer 1's (masked) SSN.
def ci_policy() -> str:
    from tests.fix_stack import DEMO_POLICY

    return (
        DEMO_POLICY.read_text()
        .replace(
            "connect_groups: [engineers, security-leads, service]",
            "connect_groups: [engineers, security-leads, service, deploy-jobs]",
        )
        .replace("groups: [engineers, security-leads, service]", "groups: [engineers, deploy-jobs]")
    )


CI_JOB = """
import os, psycopg
with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
    print(conn.execute("SELECT ssn FROM customers WHERE id = 1").fetchone()[0])
"""


def github_claims(**overrides: Any) -> dict[str, Any]:
    """Claims shaped like a GitHub Actions ID token for octo/app's main branch (push)."""
    claims = {
        "sub": "repo:octo/app:ref:refs/heads/main",
        "repository": "octo/app",
        "repository_id": "4242",
        "repository_owner": "octo",
        "repository_owner_id": "1001",
        "repository_visibility": "private",
        "ref": "refs/heads/main",
        "ref_type": "branch",
        "ref_protected": "true",
        "sha": "0" * 40,
        "workflow": "deploy",
        "workflow_ref": "octo/app/.github/workflows/deploy.yml@refs/heads/main",
        "job_workflow_ref": "octo/app/.github/workflows/deploy.yml@refs/heads/main",
        "event_name": "push",
        "run_id": "987654321",
        "run_attempt": "1",
        "actor": "dependabot-not",
        "runner_environment": "github-hosted",
    }
    claims.update(overrides)
    return claims


def gitlab_claims(**overrides: Any) -> dict[str, Any]:
    """Claims shaped like a GitLab CI `id_tokens` token for group/app's main (push)."""
    claims = {
        "sub": "project_path:group/app:ref_type:branch:ref:main",
        "namespace_id": "77",
        "namespace_path": "group",
        "project_id": "5150",
        "project_path": "group/app",
        "user_id": "12",
        "user_login": "deployer",
        "pipeline_id": "3141",
        "pipeline_source": "push",
        "job_id": "2718",
        "ref": "main",
        "ref_type": "branch",
        "ref_protected": "true",
        "runner_environment": "gitlab-hosted",
        "sha": "1" * 40,
    }
    claims.update(overrides)
    return claims


class CIIssuer:
    """One issuer on its own port: `url` is its `iss`; `kid` its key id."""

    def __init__(self, kid: str = "ci-key-1") -> None:
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.jwks_fetches = 0
        self.token_requests: list[str] = []  # the `audience` of each runner request
        self.runner_bearer = secrets.token_urlsafe(16)
        self.runner_claims: dict[str, Any] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> CIIssuer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def runner_url(self) -> str:
        """ACTIONS_ID_TOKEN_REQUEST_URL of a pretend runner (GitHub's carries a query)."""
        return f"{self.url}/actions-token?api-version=2.0"

    def jwk(self) -> dict[str, Any]:
        data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return {**data, "kid": self.kid, "use": "sig", "alg": "RS256"}

    def mint(
        self,
        claims: dict[str, Any],
        *,
        audience: str | list[str] | None,
        issuer: str | None = None,
        lifetime: int = 300,
        kid: str | None = None,
        key: Any = None,
        algorithm: str = "RS256",
        jti: bool = True,
    ) -> str:
        now = int(time.time())
        body = {"iss": issuer or self.url, "iat": now, "nbf": now - 5, "exp": now + lifetime}
        if audience is not None:
            body["aud"] = audience
        if jti:
            body["jti"] = secrets.token_hex(16)
        body.update(claims)
        headers = {"kid": kid or self.kid}
        return jwt.encode(body, key if key is not None else self.key, algorithm, headers=headers)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet: no request lines
                pass

            def _json(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                url = urlsplit(self.path)
                if url.path == "/.well-known/openid-configuration":
                    self._json(
                        200,
                        {
                            "issuer": issuer.url,
                            "jwks_uri": f"{issuer.url}/jwks",
                            "id_token_signing_alg_values_supported": ["RS256"],
                            "response_types_supported": ["id_token"],
                            "subject_types_supported": ["public"],
                        },
                    )
                elif url.path == "/jwks":
                    issuer.jwks_fetches += 1
                    self._json(200, {"keys": [issuer.jwk()]})
                elif url.path == "/actions-token":
                    if self.headers.get("Authorization") != f"Bearer {issuer.runner_bearer}":
                        self._json(401, {"message": "bad bearer"})
                        return
                    audience = parse_qs(url.query).get("audience", [""])[0]
                    issuer.token_requests.append(audience)
                    token = issuer.mint(issuer.runner_claims, audience=audience or None)
                    self._json(200, {"count": 1, "value": token})
                else:
                    self._json(404, {})

        return Handler


def serve(kid: str = "ci-key-1") -> Iterator[CIIssuer]:
    with CIIssuer(kid) as issuer:
        yield issuer
