"""A small HTTP/1.1 JSON client on the standard library: the CLI's calls to the broker API
and to the identity provider.

Why not httpx: importing it costs 100–200 ms on a small machine, more than everything else
`guard exec` does before the child starts (issue 13: session start and end ≤ 150 ms). Why
not `http.client` either: it imports the `email` package to parse headers, another 20 ms of
every command's start-up on this machine. The CLI makes a handful of requests per command
to JSON APIs, so it speaks HTTP/1.1 itself (RFC 9112): a keep-alive connection per origin,
bodies framed by Content-Length, chunked or the connection's close, and nothing else.

Imports only the standard library. Honours `https_proxy`/`http_proxy`/`no_proxy` as curl
does (HTTPS through a CONNECT tunnel, verified end to end). Headers are never logged or
put in exceptions: they carry bearer tokens. Tests replace the network with a `Transport`
(a function from `Request` to `Response`), the way httpx's `MockTransport` does.
"""

from __future__ import annotations

import base64
import json as jsonlib
import os
import select
import socket
import ssl
from collections.abc import Callable, Mapping
from urllib.parse import SplitResult, unquote, urlencode, urlsplit

from guard.cli.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from typing import Any

_MISSING: Any = object()
MAX_BODY = 16 * 1024 * 1024  # an answer larger than this is refused, not read into memory
MAX_LINE = 65536  # a status or header line, or a chunk-size line, longer than this is refused
MAX_HEADERS = 100


class TransportError(Exception):
    """The request got no HTTP answer (connection refused or reset, TLS failure, timeout)."""


class ConnectError(TransportError):
    """The server could not be reached, or its certificate was not accepted."""


class ReadTimeout(TransportError):
    """The server accepted the request but did not answer in time."""


class Request(Record):
    method: str
    url: SplitResult
    headers: dict[str, str]  # lower-case names
    content: bytes = b""


class Response:
    """An HTTP answer: status, headers (lower-case names), body, and the request."""

    __slots__ = ("status_code", "headers", "content", "request")

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
        self._connections: dict[tuple[str, str, int], _Connection] = {}

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
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        headers = {"host": _host_header(url.hostname, port, url.scheme), **request.headers}
        if url.scheme == "http" and proxy is not None:
            # Plain HTTP through a proxy: the absolute URI, and the proxy's credentials.
            path = f"http://{url.netloc}{path}"
            headers.update((k.lower(), v) for k, v in proxy.headers.items())
        head = _request_head(request.method, path, headers, request.content)
        conn = self._connection(url.scheme, url.hostname, port, proxy)
        try:
            status, answer_headers, body, keep = conn.exchange(head + request.content)
        except TimeoutError as exc:
            self._drop(url.scheme, url.hostname, port)
            raise ReadTimeout("no answer in time") from exc
        except (ssl.SSLError, ssl.CertificateError, ConnectionRefusedError, socket.gaierror) as exc:
            self._drop(url.scheme, url.hostname, port)
            raise ConnectError(describe(exc)) from exc
        except OSError as exc:
            self._drop(url.scheme, url.hostname, port)
            raise TransportError(describe(exc)) from exc
        except TransportError:
            self._drop(url.scheme, url.hostname, port)
            raise
        if not keep:
            self._drop(url.scheme, url.hostname, port)
        return Response(status, content=body, headers=answer_headers, request=request)

    def _connection(self, scheme: str, host: str, port: int, proxy: Proxy | None) -> _Connection:
        key = (scheme, host, port)
        conn = self._connections.get(key)
        if conn is not None and _stale(conn.sock):
            # The server closed an idle keep-alive connection (uvicorn does after 5 s):
            # a request sent on it would fail after the server may have seen nothing,
            # and a POST must not be retried blindly. Open a new one instead.
            self._drop(*key)
            conn = None
        if conn is None:
            dial_host, dial_port = (proxy.host, proxy.port) if proxy else (host, port)
            sock: socket.socket | None = None
            try:
                sock = socket.create_connection((dial_host, dial_port), self.connect_timeout)
                if scheme == "https":
                    if proxy is not None:
                        # CONNECT through the proxy; TLS (and its host name check) is still
                        # end to end with `host`, so the proxy sees nothing but ciphertext.
                        _open_tunnel(sock, host, port, proxy.headers)
                    context = self.context or ssl.create_default_context()
                    sock = context.wrap_socket(sock, server_hostname=host)
            except (OSError, ssl.SSLError, TransportError) as exc:
                if sock is not None:
                    sock.close()
                if isinstance(exc, ConnectError):
                    raise
                raise ConnectError(describe(exc)) from exc
            sock.settimeout(self.timeout)
            conn = self._connections[key] = _Connection(sock)
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
    if isinstance(exc, TransportError):
        return str(exc)  # ours: written without the request's headers
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its TLS certificate did not verify ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or type(exc).__name__})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


class Proxy(Record):
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


def _stale(sock: socket.socket) -> bool:
    """An idle connection with something to read has been closed by the server (or holds
    bytes nobody asked for): either way it cannot carry the next request."""
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


# ------------------------------------------------------------------ HTTP/1.1 on a socket
def _host_header(host: str, port: int, scheme: str) -> str:
    if not host.isascii():
        host = host.encode("idna").decode("ascii")  # an internationalized name, as DNS has it
    name = f"[{host}]" if ":" in host else host  # an IPv6 literal
    return name if port == (443 if scheme == "https" else 80) else f"{name}:{port}"


def _request_head(method: str, target: str, headers: Mapping[str, str], body: bytes) -> bytes:
    """The request line and headers. A line break or NUL in a name or value is refused,
    not sent: it would let whoever chose the value (an IdP's token, a URL in a config)
    add headers or a second request to the connection (request splitting)."""
    lines = [f"{method} {target} HTTP/1.1"]
    fields = dict(headers)
    if body or method in ("POST", "PUT", "PATCH"):
        fields["content-length"] = str(len(body))
    for name, value in fields.items():
        if not name or any(c in name for c in " :\r\n\0") or any(c in value for c in "\r\n\0"):
            raise TransportError(f"refusing to send header {name!r}: it holds a line break")
        lines.append(f"{name}: {value}")
    if any(c in target for c in " \r\n\0") or not target.isascii():
        raise TransportError(
            "refusing to send a request target with spaces, line breaks or non-ASCII"
        )
    try:
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError:
        raise TransportError("refusing to send a header that is not Latin-1 text") from None


class _Connection:
    """One client connection, plain or TLS: a request out, its answer in."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def exchange(self, request: bytes) -> tuple[int, dict[str, str], bytes, bool]:
        """Send `request` (head and body); (status, headers, body, whether the connection
        can carry another request)."""
        self.sock.sendall(request)
        status, version, headers = _read_head(self.reader)
        while 100 <= status < 200:  # interim answers (100 Continue, 103 Early Hints)
            status, version, headers = _read_head(self.reader)
        connection = headers.get("connection", "").lower()
        keep = "close" not in connection and (version == "HTTP/1.1" or "keep-alive" in connection)
        if status in (204, 304):
            return status, headers, b"", keep
        if "transfer-encoding" in headers:
            if headers["transfer-encoding"].lower() != "chunked":
                raise TransportError(
                    f"unsupported transfer coding {headers['transfer-encoding']!r}"
                )
            return status, headers, _read_chunked(self.reader), keep
        if "content-length" in headers:
            length = headers["content-length"]
            if not length.isdigit():  # also refuses "5, 7": two lengths that disagree
                raise TransportError("malformed answer: bad Content-Length")
            if int(length) > MAX_BODY:
                raise TransportError(f"answer larger than {MAX_BODY} bytes")
            body = self.reader.read(int(length))
            if len(body) < int(length):
                raise TransportError("the server closed the connection mid-answer")
            return status, headers, body, keep
        # No framing: the body ends when the server closes the connection.
        body = self.reader.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            raise TransportError(f"answer larger than {MAX_BODY} bytes")
        return status, headers, body, False


def _read_line(reader: Any) -> bytes:
    line: bytes = reader.readline(MAX_LINE + 1)
    if not line:
        raise TransportError("the server closed the connection without answering")
    if len(line) > MAX_LINE or not line.endswith(b"\n"):
        raise TransportError("malformed answer: a line too long or cut short")
    return line.rstrip(b"\r\n")


def _read_head(reader: Any) -> tuple[int, str, dict[str, str]]:
    """The status line and header fields; names lower-cased, repeated fields joined."""
    version, _, rest = _read_line(reader).decode("latin-1").partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise TransportError("malformed answer: not an HTTP/1.x status line")
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = _read_line(reader).decode("latin-1")
        if not line:
            return int(code), version, headers
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():  # also obsolete line folding
            raise TransportError("malformed answer: a bad header line")
        key = name.lower()
        value = value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    raise TransportError(f"malformed answer: more than {MAX_HEADERS} header fields")


def _read_chunked(reader: Any) -> bytes:
    body = bytearray()
    while True:
        size_text = _read_line(reader).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise TransportError("malformed answer: bad chunk size") from None
        if size == 0:
            while _read_line(reader):  # trailer fields, ignored
                pass
            return bytes(body)
        if len(body) + size > MAX_BODY:
            raise TransportError(f"answer larger than {MAX_BODY} bytes")
        chunk = reader.read(size + 2)
        if len(chunk) < size + 2 or chunk[size:] != b"\r\n":
            raise TransportError("malformed answer: a chunk cut short")
        body += chunk[:size]


def _open_tunnel(sock: socket.socket, host: str, port: int, headers: Mapping[str, str]) -> None:
    """Ask the proxy on `sock` for a tunnel to host:port (CONNECT, RFC 9110 §9.3.6)."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sock.sendall(_request_head("CONNECT", authority, {"host": authority, **headers}, b""))
    answer = b""
    while b"\r\n\r\n" not in answer:
        data = sock.recv(4096)
        if not data or len(answer) > MAX_LINE:
            raise TransportError("the proxy closed the connection or sent too much")
        answer += data
    head, _, extra = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    if status_line.split(" ")[1:2] != ["200"] or extra:
        # The proxy's own words (e.g. 407 Proxy Authentication Required), not its body.
        raise ConnectError(f"the proxy refused the tunnel: {status_line[:100]}")
