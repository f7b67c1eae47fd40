"""A small HTTP/1.1 JSON client on the standard library: the CLI's calls to the broker API
and to the identity provider.

Why not httpx: importing it costs 100–200 ms on a small machine, more than everything else
`guard exec` does before the child starts (issue 13: session start and end ≤ 150 ms). The
CLI makes a handful of requests per command, so a keep-alive connection per client and
`http.client` are all it needs.

Imports only the standard library. Honours `https_proxy`/`http_proxy`/`no_proxy` as curl
does (HTTPS through a CONNECT tunnel, verified end to end). Headers are never logged or
put in exceptions: they carry bearer tokens. Tests replace the network with a `Transport`
(a function from `Request` to `Response`), the way httpx's `MockTransport` does.
"""

from __future__ import annotations

import base64
import http.client
import json as jsonlib
import os
import select
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, unquote, urlencode, urlsplit

_MISSING: Any = object()
MAX_BODY = 16 * 1024 * 1024  # an answer larger than this is refused, not read into memory


class TransportError(Exception):
    """The request got no HTTP answer (connection refused or reset, TLS failure, timeout)."""


class ConnectError(TransportError):
    """The server could not be reached, or its certificate was not accepted."""


class ReadTimeout(TransportError):
    """The server accepted the request but did not answer in time."""


@dataclass(frozen=True)
class Request:
    method: str
    url: SplitResult
    headers: dict[str, str]  # lower-case names
    content: bytes = b""


@dataclass
class Response:
    status_code: int
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    content: bytes = b""
    request: Request | None = None

    def __init__(
        self,
        status_code: int,
        *,
        json: Any = _MISSING,
        content: bytes = b"",
        headers: Mapping[str, str] | None = None,
        request: Request | None = None,
    ) -> None:
        self.status_code = status_code
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        if json is not _MISSING:
            content = jsonlib.dumps(json).encode()
            self.headers.setdefault("content-type", "application/json")
        self.content = content
        self.request = request

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not."""
        return jsonlib.loads(self.content)


Transport = Callable[[Request], Response]


class HttpClient:
    """Requests to one base URL (or absolute URLs), over one keep-alive connection per
    origin. Not thread-safe: give each thread its own client."""

    def __init__(
        self,
        base_url: str = "",
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        context: ssl.SSLContext | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        # HTTPS without a context of the caller's is verified against the system store.
        self.context = context
        self.transport = transport
        self._connections: dict[tuple[str, str, int], http.client.HTTPConnection] = {}

    def get(self, url: str) -> Response:
        return self.request("GET", url)

    def post(
        self, url: str, *, json: Any = _MISSING, data: Mapping[str, str] | None = None
    ) -> Response:
        return self.request("POST", url, json=json, data=data)

    def request(
        self,
        method: str,
        url: str,
        *,
        json: Any = _MISSING,
        data: Mapping[str, str] | None = None,
    ) -> Response:
        """One request; the answer whatever its status. TransportError when there is none."""
        target = urlsplit(url if "://" in url else self.base_url + url)
        headers = {"accept": "application/json", **self.headers}
        content = b""
        if json is not _MISSING:
            content = jsonlib.dumps(json).encode()
            headers["content-type"] = "application/json"
        elif data is not None:
            content = urlencode(data).encode()
            headers["content-type"] = "application/x-www-form-urlencoded"
        request = Request(method, target, headers, content)
        if self.transport is not None:
            response = self.transport(request)
            response.request = request
            return response
        return self._send(request)

    def _send(self, request: Request) -> Response:
        url = request.url
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConnectError(f"not an http(s) URL: {url.geturl()!r}")
        port = url.port or (443 if url.scheme == "https" else 80)
        proxy = proxy_for(url.scheme, url.hostname)
        conn = self._connection(url.scheme, url.hostname, port, proxy)
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        headers = request.headers
        if url.scheme == "http" and proxy is not None:
            # Plain HTTP through a proxy: the absolute URI, and the proxy's credentials.
            path = f"http://{url.netloc}{path}"
            headers = {**headers, **proxy.headers}
        try:
            conn.request(request.method, path, body=request.content or None, headers=headers)
            answer = conn.getresponse()
            body = answer.read(MAX_BODY + 1)
            if len(body) > MAX_BODY:
                raise http.client.HTTPException(f"answer larger than {MAX_BODY} bytes")
        except TimeoutError as exc:
            self._drop(url.scheme, url.hostname, port)
            raise ReadTimeout("no answer in time") from exc
        except (ssl.SSLError, ssl.CertificateError, ConnectionRefusedError, socket.gaierror) as exc:
            self._drop(url.scheme, url.hostname, port)
            raise ConnectError(describe(exc)) from exc
        except (OSError, http.client.HTTPException) as exc:
            self._drop(url.scheme, url.hostname, port)
            raise TransportError(describe(exc)) from exc
        if answer.will_close:
            self._drop(url.scheme, url.hostname, port)
        return Response(
            answer.status, content=body, headers=dict(answer.getheaders()), request=request
        )

    def _connection(
        self, scheme: str, host: str, port: int, proxy: Proxy | None
    ) -> http.client.HTTPConnection:
        key = (scheme, host, port)
        conn = self._connections.get(key)
        if conn is not None and _stale(conn):
            # The server closed an idle keep-alive connection (uvicorn does after 5 s):
            # a request sent on it would fail after the server may have seen nothing,
            # and a POST must not be retried blindly. Open a new one instead.
            self._drop(*key)
            conn = None
        if conn is None:
            dial_host, dial_port = (proxy.host, proxy.port) if proxy else (host, port)
            if scheme == "https":
                context = self.context or ssl.create_default_context()
                conn = http.client.HTTPSConnection(
                    dial_host, dial_port, timeout=self.connect_timeout, context=context
                )
                if proxy is not None:
                    # CONNECT through the proxy; TLS (and its host name check) is still
                    # end to end with `host`, so the proxy sees nothing but ciphertext.
                    conn.set_tunnel(host, port, headers=proxy.headers)
            else:
                conn = http.client.HTTPConnection(
                    dial_host, dial_port, timeout=self.connect_timeout
                )
            try:
                conn.connect()
            except (OSError, ssl.SSLError) as exc:
                conn.close()
                raise ConnectError(describe(exc)) from exc
            if conn.sock is not None:
                conn.sock.settimeout(self.timeout)
            self._connections[key] = conn
        return conn

    def _drop(self, scheme: str, host: str, port: int) -> None:
        conn = self._connections.pop((scheme, host, port), None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def describe(exc: BaseException) -> str:
    """Why a request got no answer, in words a user can act on; never the request's
    headers (they carry bearer tokens), only the exception's kind and reason."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its TLS certificate did not verify ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or type(exc).__name__})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    headers: dict[str, str]  # Proxy-Authorization, when the proxy URL carries credentials


def proxy_for(scheme: str, host: str, environ: Mapping[str, str] | None = None) -> Proxy | None:
    """The proxy `https_proxy`/`http_proxy` (or upper case) name for `host`, unless
    `no_proxy` lists it (a host, a domain suffix, or `*`): the variables curl, httpx and
    urllib read, so a CLI behind a corporate proxy reaches the broker and the IdP."""
    env = os.environ if environ is None else environ
    bypass = env.get("no_proxy") or env.get("NO_PROXY") or ""
    for entry in (e.strip().lower().lstrip(".") for e in bypass.split(",")):
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return None
    value = env.get(f"{scheme}_proxy") or env.get(f"{scheme.upper()}_PROXY") or ""
    if not value:
        return None
    parsed = urlsplit(value if "://" in value else f"http://{value}")
    if not parsed.hostname:
        return None
    headers = {}
    if parsed.username is not None:
        secret = f"{unquote(parsed.username)}:{unquote(parsed.password or '')}"
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(secret.encode()).decode()
    return Proxy(parsed.hostname, parsed.port or 80, headers)


def _stale(conn: http.client.HTTPConnection) -> bool:
    """An idle connection with something to read has been closed by the server (or holds
    bytes nobody asked for): either way it cannot carry the next request."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    if not readable:
        return False
    if isinstance(sock, ssl.SSLSocket):
        # TLS 1.3 servers send session tickets after the handshake: readable, yet alive.
        # Read them without blocking; EOF or a real byte means the connection is done.
        previous = sock.gettimeout()
        try:
            sock.setblocking(False)
            sock.recv(1)  # b"" (EOF) or an unasked-for byte
            return True
        except ssl.SSLWantReadError:
            return False  # only TLS records (tickets): nothing for the application
        except OSError:
            return True
        finally:
            sock.settimeout(previous)
    return True
