"""The CLI's session path without heavy imports (issue 13: `guard exec` start-up): its
stdlib HTTP client against a real server, the wire types held to the broker's models, the
unverified `exp` read, tokens read from where the login put them, and no httpx, pydantic,
PyJWT, keyring or asyncio loaded on the way."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from guard.broker.api import schemas
from guard.cli import auth, http, wire
from guard.cli.profile import Profile

# ------------------------------------------------------------------ what the path imports
HEAVY = (
    "httpx",
    "pydantic",
    "jwt",
    "keyring",
    "asyncio",
    "rich",
    "cryptography",
    "http.client",
    "email",
)


def test_the_session_path_imports_nothing_heavy():
    code = (
        "import sys, json\n"
        "import guard.cli.auth, guard.cli.client, guard.cli.runner\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == []


# ------------------------------------------------------------------ wire types vs schemas
@pytest.mark.parametrize(
    ("light", "model"),
    [(wire.SessionCreated, schemas.SessionCreated), (wire.ErrorBody, schemas.ErrorBody)],
)
def test_the_wire_types_are_the_brokers_models(light, model):
    """Same field names, types and defaults: a field the broker adds, renames or retypes
    fails here before a CLI reads it wrongly."""
    # The annotations as Python evaluates them (the CLI reads them without `typing`).
    hints = {name: eval(light.__annotations__[name], vars(wire)) for name in light._fields}
    mine = {name: (hints[name], light._defaults.get(name)) for name in light._fields}
    theirs = {
        name: (info.annotation, None if info.is_required() else info.default)
        for name, info in model.model_fields.items()
    }
    assert mine == theirs


CREATED = {
    "session_id": "ses1",
    "gateway_host": "gw",
    "gateway_port": 6432,
    "gateway_tls": True,
    "database": "demo",
    "user": "guard_ses1",
    "password": "s3cret-session-password",
    "expires_at": "2026-12-03T13:00:00Z",
    "principal": "alice",
    "session_token": "gsc_x",
    "heartbeat_interval_seconds": 10,
}


def test_a_session_reads_like_the_brokers_model_reads_it():
    mine = wire.SessionCreated.from_json(CREATED)
    theirs = schemas.SessionCreated.model_validate(CREATED)
    for name in schemas.SessionCreated.model_fields:
        assert getattr(mine, name) == getattr(theirs, name), name
    assert isinstance(mine.expires_at, datetime) and mine.expires_at.tzinfo is not None
    assert "s3cret" not in repr(mine) and "gsc_x" not in repr(mine)


@pytest.mark.parametrize(
    "change",
    [
        {"gateway_port": "6432"},  # a string is not a port
        {"gateway_port": True},  # nor is a bool
        {"gateway_tls": 1},
        {"expires_at": "tomorrow"},
        {"password": None},
        {"heartbeat_interval_seconds": "10"},
    ],
    ids=str,
)
def test_a_malformed_session_is_refused_naming_the_field(change):
    with pytest.raises(ValueError, match=repr(next(iter(change)))):
        wire.SessionCreated.from_json({**CREATED, **change})


def test_a_missing_field_or_a_non_object_is_refused():
    body = {k: v for k, v in CREATED.items() if k != "user"}
    with pytest.raises(ValueError, match="'user' is missing"):
        wire.SessionCreated.from_json(body)
    with pytest.raises(ValueError):
        wire.SessionCreated.from_json([CREATED])
    assert wire.ErrorBody.from_json({"error": "e", "message": "m"}).hint is None


# ------------------------------------------------------------------ exp without PyJWT
def _jwt(payload: Any) -> str:
    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return f"{part(b'{}')}.{part(raw)}.{part(b'sig')}"


def test_seconds_left_reads_exp_without_verifying():
    left = auth.seconds_left(_jwt({"exp": time.time() + 300, "sub": "alice"}))
    assert 290 < left <= 300
    assert auth.unverified_claims(_jwt({"sub": "a"})) == {"sub": "a"}


@pytest.mark.parametrize(
    "token",
    [
        "",
        "a.b",
        "a.b.c.d",
        "x.!!!.y",
        _jwt(b"not json"),
        _jwt([1]),
        _jwt({"exp": "soon"}),
        _jwt({"exp": True}),
        _jwt({"sub": "no exp"}),
    ],
)
def test_an_unreadable_token_counts_as_expired(token):
    assert auth.seconds_left(token) == -1.0


# ------------------------------------------------------------------ tokens where login put them
def test_a_login_in_the_file_is_read_without_asking_the_keychain(tmp_path, monkeypatch):
    monkeypatch.setenv("GUARD_HOME", str(tmp_path))
    monkeypatch.delenv("GUARD_KEYRING", raising=False)
    profile = Profile(broker_url="https://broker", issuer="https://idp")
    (tmp_path / "credentials.json").write_text(
        json.dumps({"https://idp guard-cli": {"id_token": "t"}})
    )

    def no_keychain_discovery():
        raise AssertionError("keyring discovery ran although the file holds the login")

    monkeypatch.setattr(auth, "system_keyring", no_keychain_discovery)
    store = auth.TokenStore(profile)
    assert store.load() == {"id_token": "t"}
    assert not store.uses_keyring


def test_without_a_login_in_the_file_the_keychain_is_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("GUARD_HOME", str(tmp_path))
    profile = Profile(broker_url="https://broker", issuer="https://idp")

    class Keychain:
        def get_password(self, service: str, username: str) -> str | None:
            return json.dumps({"id_token": "from-keychain"})

    monkeypatch.setattr(auth, "system_keyring", Keychain)
    assert auth.TokenStore(profile).load() == {"id_token": "from-keychain"}


# ------------------------------------------------------------------ the HTTP client
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    seen: list[tuple[str, str, int]] = []

    def _answer(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        port = self.client_address[1]
        type(self).seen.append(("GET", self.path, port))
        if self.path == "/slow":
            time.sleep(1.0)
        self._answer(200, {"path": self.path, "auth": self.headers.get("Authorization")})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        type(self).seen.append(("POST", self.path, self.client_address[1]))
        self._answer(201, {"got": body.decode(), "type": self.headers.get("Content-Type")})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    _Handler.seen = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _url(srv: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}"


def test_json_and_forms_go_out_and_answers_come_back_on_one_connection(server):
    with http.HttpClient(_url(server), headers={"Authorization": "Bearer t"}) as client:
        got = client.get("/a?x=1")
        assert got.status_code == 200
        assert got.json() == {"path": "/a?x=1", "auth": "Bearer t"}
        posted = client.post("/b", json={"k": "v"})
        assert posted.status_code == 201
        assert posted.json() == {"got": '{"k": "v"}', "type": "application/json"}
        form = client.post("/c", data={"grant_type": "refresh_token", "a": "b c"})
        assert form.json() == {
            "got": "grant_type=refresh_token&a=b+c",
            "type": "application/x-www-form-urlencoded",
        }
    ports = {port for _, _, port in _Handler.seen}
    assert len(ports) == 1  # keep-alive: one TCP connection for the three requests


def test_a_connection_the_server_closed_is_replaced_not_reused(server):
    """uvicorn closes idle keep-alive connections after 5 s; the next POST must go out
    once, on a new connection, not fail and not be sent twice."""
    client = http.HttpClient(_url(server))
    client.get("/first")
    (conn,) = client._connections.values()
    assert conn.sock is not None
    conn.sock.shutdown(socket.SHUT_RDWR)  # as if the server had closed it
    time.sleep(0.05)
    assert client.post("/once", json={}).status_code == 201
    assert [path for method, path, _ in _Handler.seen if method == "POST"] == ["/once"]
    client.close()


def test_no_answer_is_a_transport_error_without_headers(server):
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    port = refused.getsockname()[1]
    refused.close()
    client = http.HttpClient(f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer SECRET"})
    with pytest.raises(http.ConnectError, match="Connection refused") as caught:
        client.get("/x")
    assert "SECRET" not in str(caught.value)
    slow = http.HttpClient(_url(server), timeout=0.2)
    with pytest.raises(http.ReadTimeout):
        slow.get("/slow")
    assert slow.get("/fast").status_code == 200  # a new connection after the timeout


def test_https_is_verified_against_the_given_ca(tmp_path):
    from guard.devstack.tls import broker_cert, make_dev_ca

    ca, _, _ = make_dev_ca(tmp_path)
    cert, key = broker_cert(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    other_ca, _, _ = make_dev_ca(other)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{srv.server_address[1]}"
    try:
        good = ssl.create_default_context(cafile=str(ca))
        with http.HttpClient(url, context=good) as client:
            assert client.get("/ok").status_code == 200
            time.sleep(0.1)  # TLS 1.3 session tickets arrive: the connection stays usable
            assert client.get("/again").status_code == 200
        wrong = ssl.create_default_context(cafile=str(other_ca))
        with (
            pytest.raises(http.ConnectError, match="TLS certificate did not verify"),
            http.HttpClient(url, context=wrong) as client,
        ):
            client.get("/no")
        with pytest.raises(http.ConnectError), http.HttpClient(url) as client:
            client.get("/system-store")  # the dev CA is in no system store
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_transport_stands_in_for_the_network():
    seen: list[http.Request] = []

    def fake(request: http.Request) -> http.Response:
        seen.append(request)
        return http.Response(418, json={"teapot": True})

    client = http.HttpClient("https://broker.test/", headers={"X-A": "b"}, transport=fake)
    answer = client.post("/v1/x", json=[1])
    assert (answer.status_code, answer.json(), answer.text) == (418, {"teapot": True}, answer.text)
    (request,) = seen
    assert (request.method, request.url.netloc, request.url.path) == (
        "POST",
        "broker.test",
        "/v1/x",
    )
    assert request.headers["x-a"] == "b" and request.content == b"[1]"
    assert answer.request is request


class _Canned:
    """A server that answers each request on a connection with the next canned bytes,
    exactly as given, and records the requests' raw bytes; closes after the last."""

    def __init__(self, *answers: bytes) -> None:
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.sock.accept()
            with conn:
                pending = b""
                while self.answers:
                    while b"\r\n\r\n" not in pending:
                        pending += conn.recv(4096)
                    head, _, pending = pending.partition(b"\r\n\r\n")
                    self.requests.append(head)
                    conn.sendall(self.answers.pop(0))

    def close(self) -> None:
        self.sock.close()


OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize(
    "answer",
    [
        OK_HEAD + b"Content-Length: 7\r\n\r\n[1,2,3]",
        OK_HEAD
        + b"Transfer-Encoding: chunked\r\n\r\n3;ext=1\r\n[1,\r\n4\r\n2,3]\r\n0\r\nX-T: 1\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n" + OK_HEAD + b"Content-Length: 7\r\n\r\n[1,2,3]",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n[1,2,3]",  # framed by the close
    ],
    ids=["content-length", "chunked", "interim-100", "until-close"],
)
def test_every_framing_of_an_answer_reads_the_same_body(answer):
    closes = b"close" in answer
    server = (
        _Canned(answer) if closes else _Canned(answer, OK_HEAD + b"Content-Length: 2\r\n\r\n[]")
    )
    try:
        with http.HttpClient(server.url, timeout=5) as client:
            got = client.get("/x")
            assert (got.status_code, got.json()) == (200, [1, 2, 3])
            assert bool(client._connections) is not closes  # kept for the next request
            if not closes:
                assert client.get("/y").json() == []
    finally:
        server.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        OK_HEAD + b"Content-Length: 5, 7\r\n\r\n12345",
        OK_HEAD + b"Content-Length: 9\r\n\r\nshort",  # then the connection closes
        OK_HEAD + b"Transfer-Encoding: gzip\r\n\r\n",
        OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
        OK_HEAD + b" folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n",
        b"",  # closed without a word
    ],
    ids=[
        "not-http",
        "short-code",
        "two-lengths",
        "cut-short",
        "unknown-coding",
        "bad-chunk",
        "folding",
        "too-many-fields",
        "long-line",
        "nothing",
    ],
)
def test_a_malformed_answer_is_a_transport_error_and_the_connection_is_dropped(answer):
    server = _Canned(answer)
    try:
        client = http.HttpClient(server.url, headers={"Authorization": "Bearer SECRET"}, timeout=5)
        with pytest.raises(http.TransportError) as caught:
            client.get("/x")
        assert "SECRET" not in str(caught.value)
        assert not client._connections
    finally:
        server.close()


def test_a_body_over_the_limit_is_refused_unread(monkeypatch):
    monkeypatch.setattr(http, "MAX_BODY", 10)
    for answer in (
        OK_HEAD + b"Content-Length: 11\r\n\r\n",
        OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n",
    ):
        server = _Canned(answer)
        try:
            with pytest.raises(http.TransportError, match="larger than 10 bytes"):
                http.HttpClient(server.url).get("/x")
        finally:
            server.close()


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer a\r\nX-Admin: 1"},
        {"X-A\r\nB": "c"},
        {"X\0": "1"},
        {"X-Name": "\u2603"},  # not Latin-1: refused, not a traceback
    ],
)
def test_a_header_with_a_line_break_or_no_latin1_is_refused_not_sent(headers):
    server = _Canned(OK_HEAD + b"Content-Length: 2\r\n\r\n{}")
    try:
        with pytest.raises(http.TransportError, match="refusing to send"):
            http.HttpClient(server.url, headers=headers).get("/x")
        assert server.requests == []
    finally:
        server.close()


def test_a_path_that_is_not_ascii_is_refused_not_sent():
    server = _Canned(OK_HEAD + b"Content-Length: 2\r\n\r\n{}")
    try:
        with pytest.raises(http.TransportError, match="refusing to send"):
            http.HttpClient(server.url).get("/caf\u00e9")
        assert server.requests == []
    finally:
        server.close()


def test_the_request_says_host_and_length_as_http_1_1_asks():
    server = _Canned(OK_HEAD + b"Content-Length: 2\r\n\r\n{}")
    try:
        http.HttpClient(server.url).post("/p", json={})
        line, *fields = server.requests[0].decode().split("\r\n")
        assert line == "POST /p HTTP/1.1"
        port = server.url.rsplit(":", 1)[1]
        assert {"host: 127.0.0.1:" + port, "content-length: 2"} <= set(fields)
    finally:
        server.close()


# ------------------------------------------------------------------ through a proxy
def test_proxy_settings_are_read_as_curl_reads_them():
    env = {"HTTPS_PROXY": "http://u%40corp:p%3Ass@proxy.corp:3128", "no_proxy": "internal, .lan"}
    proxy = http.proxy_for("https", "idp.example.com", env)
    assert proxy is not None and (proxy.host, proxy.port) == ("proxy.corp", 3128)
    assert proxy.headers == {
        "Proxy-Authorization": "Basic " + base64.b64encode(b"u@corp:p:ss").decode()
    }
    assert http.proxy_for("https", "broker.internal", env) is None  # listed
    assert http.proxy_for("https", "db.lan", env) is None  # a suffix
    assert http.proxy_for("https", "x", {"https_proxy": "proxy:8080", "NO_PROXY": "*"}) is None
    assert http.proxy_for("http", "idp.example.com", env) is None  # only HTTPS_PROXY set
    assert http.proxy_for("https", "a", {"https_proxy": "proxy:8080"}).headers == {}


class _ConnectProxy:
    """A CONNECT-only proxy that remembers what it was asked and splices the tunnel."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str | None]] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += client.recv(4096)
        lines = head.decode().split("\r\n")
        auth = next(
            (v for k, _, v in (x.partition(": ") for x in lines[1:]) if k == "Proxy-Authorization"),
            None,
        )
        target = lines[0].split()[1]
        self.asked.append((lines[0], auth))
        host, _, port = target.rpartition(":")
        upstream = socket.create_connection((host, int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

        def pipe(a: socket.socket, b: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := a.recv(65536):
                    b.sendall(data)
            with contextlib.suppress(OSError):
                b.shutdown(socket.SHUT_WR)

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)

    def close(self) -> None:
        self.sock.close()


def test_https_goes_through_a_connect_proxy_verified_end_to_end(tmp_path, monkeypatch):
    from guard.devstack.tls import broker_cert, make_dev_ca

    ca, _, _ = make_dev_ca(tmp_path)
    cert, key = broker_cert(tmp_path)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    proxy = _ConnectProxy()
    monkeypatch.setenv("HTTPS_PROXY", f"http://me:secret@127.0.0.1:{proxy.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    url = f"https://127.0.0.1:{srv.server_address[1]}"
    try:
        verified = ssl.create_default_context(cafile=str(ca))
        with http.HttpClient(url, context=verified) as client:
            assert client.get("/through").json()["path"] == "/through"
        assert proxy.asked == [
            (
                f"CONNECT 127.0.0.1:{srv.server_address[1]} HTTP/1.1",
                "Basic " + base64.b64encode(b"me:secret").decode(),
            )
        ]
        with pytest.raises(http.ConnectError), http.HttpClient(url) as client:
            client.get("/unverified")  # the proxy cannot vouch for the server
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        with http.HttpClient(url, context=verified) as client:
            client.get("/direct")
        assert len(proxy.asked) == 2  # the bypassed request did not reach the proxy
    finally:
        proxy.close()
        srv.shutdown()
        srv.server_close()
