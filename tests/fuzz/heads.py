"""Request heads for the fuzz target: a hypothesis strategy, the seed-corpus file format, the
checks of the proxy's pure head functions, and the oracle for a real proxy's answers.

A head is kept as bytes (what goes on the wire) and decoded the way aiohttp's C parser decodes
it (UTF-8 with ``surrogateescape``) before it reaches the pure functions, so they see exactly
the strings the pipeline would hand them.
"""

from __future__ import annotations

import codecs
import contextlib
import ipaddress
import json
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

from proxy.core.apikeys import PREFIX_LEN, bearer_key, parse_key, presented_key
from proxy.core.cors import normalize_origin, preflight_headers
from proxy.core.forwarding import (
    client_address,
    connection_named,
    request_headers_to_forward,
    request_id,
    response_headers_to_return,
)
from proxy.core.framing import framing_problem
from proxy.core.hosts import BadHost, classify_host, normalize_host
from proxy.core.paths import BadTarget, resolve_dot_segments, split_target
from proxy.core.routes import RouteTable
from tests.procs import ACME_ID, DEFAULT_ID, DEMO_KEY, DEMO_TEST_KEY

HOST = "videos.acme.test"
PLATFORM = ("flatrender.test",)
KEY_IDS = {"3b0d7a52-5f0e-4c1a-8d2e-6a1f9b7c4e01", "3b0d7a52-5f0e-4c1a-8d2e-6a1f9b7c4e02"}
# The echo upstream acts on these last path segments (sleeps, resets, streams): never sent.
ECHO_SPECIAL = ("stream", "slow", "reset", "truncate", "hop", "ws", "__count")
_DOTS = {".", "..", "%2e", "%2E", ".%2e", ".%2E", "%2e.", "%2E.", "%2e%2e", "%2E%2E", "%2e%2E"}
_HOP = {"connection", "keep-alive", "te", "trailer", "upgrade", "proxy-connection"}
_NEVER_UPSTREAM = _HOP | {"x-api-key", "forwarded", "proxy-authorization", "expect"}


# --------------------------------------------------------------------------- the head


@dataclass
class Head:
    """One request as bytes: request line, field lines, body. ``raw`` overrides everything."""

    method: bytes = b"GET"
    target: bytes = b"/public/x"
    version: bytes = b"HTTP/1.1"
    fields: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    raw: bytes | None = None

    def encode(self) -> bytes:
        if self.raw is not None:
            return self.raw
        lines = [self.method + b" " + self.target + b" " + self.version]
        lines += [name + b": " + value for name, value in self.fields]
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.body


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")  # as aiohttp's C parser does


@dataclass
class Parsed:
    """A head split the simple way (CRLF lines, first colon), decoded as aiohttp decodes."""

    method: str
    target: str
    version: tuple[int, int] | None
    headers: list[tuple[str, str]]


def parse_head(data: bytes) -> Parsed | None:
    head = data.partition(b"\r\n\r\n")[0]
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        return None
    m = re.fullmatch(rb"HTTP/(\d)\.(\d)", parts[2])
    version = (int(m.group(1)), int(m.group(2))) if m else None
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            headers.append((_decode(name), _decode(value.strip(b" \t"))))
    return Parsed(_decode(parts[0]), _decode(parts[1]), version, headers)


# --------------------------------------------------------------------------- the strategy

_KEY_VALUES = [
    DEMO_KEY,
    DEMO_TEST_KEY,
    f"Bearer {DEMO_KEY}",
    f"bearer  {DEMO_KEY} ",
    f"Bearer\t{DEMO_KEY}",
    f"Bearer {DEMO_TEST_KEY}",
    "Bearer fr_live_" + "x" * 40,
    "Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig",
    "Basic dXNlcjpwYXNz",
    "fr_live_short",
]
_INTERESTING_VALUES = [
    "close",
    "keep-alive",
    "Upgrade",
    "close, X-FlatRender-Tenant-Id, Authorization",
    "keep-alive, X-Forwarded-For",
    "h2c",
    "websocket",
    "100-continue",
    "foo",
    "trailers",
    "1.2.3.4",
    "1.2.3.4, 10.0.0.1, 127.0.0.1",
    "garbage, ::1, [2001:db8::1]:443",
    "for=1.2.3.4;proto=https",
    ACME_ID,
    "11111111-1111-1111-1111-111111111111",
    "https://www.acme.test",
    "https://evil.test",
    "null",
    "https://*.acme.test",
    "GET",
    "x-custom, authorization",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "",
    " ",
    "a" * 300,
]
_NAMES = [
    "X-FlatRender-Tenant-Id",
    "x-flatrender-api-key-id",
    "X-FlatRender-Scopes",
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "Forwarded",
    "X-Request-Id",
    "Authorization",
    "X-API-Key",
    "Origin",
    "Access-Control-Request-Method",
    "Access-Control-Request-Headers",
    "Connection",
    "Upgrade",
    "Keep-Alive",
    "TE",
    "Trailer",
    "Proxy-Connection",
    "Proxy-Authorization",
    "Expect",
    "Content-Type",
    "Cookie",
    "traceparent",
    "User-Agent",
    "X-Custom",
]
# Bytes a field name or value may hold on the wire, legal or not.
_ODD = [b"\x00", b"\x01", b"\x7f", b"\xff", b"\xc3\xa9", b"\r", b"\n", b"\t", b" ", b":", b","]

_token_bytes = st.binary(min_size=1, max_size=12).map(
    lambda b: bytes(c for c in b if 0x21 <= c <= 0x7E and c not in b':()<>@,;"/[]?={}\\') or b"X"
)
_name = st.one_of(
    st.sampled_from(_NAMES).map(str.encode),
    st.sampled_from(_NAMES).map(lambda n: n.upper().encode()),
    _token_bytes,
    st.tuples(st.sampled_from(_NAMES).map(str.encode), st.sampled_from(_ODD)).map(
        lambda t: t[0][:3] + t[1] + t[0][3:]
    ),
)
_value = st.one_of(
    st.sampled_from(_KEY_VALUES + _INTERESTING_VALUES).map(str.encode),
    st.binary(max_size=24).filter(lambda b: b"\r\n\r\n" not in b),
    st.tuples(st.sampled_from(_INTERESTING_VALUES), st.sampled_from(_ODD)).map(
        lambda t: t[0].encode()[:2] + t[1] + t[0].encode()[2:]
    ),
)

_HOSTS = [
    HOST,
    "VIDEOS.ACME.TEST.",
    f"{HOST}:8080",
    f"{HOST}:",
    f"{HOST}:99999999999",
    "acme.flatrender.test",
    "flatrender.test",
    "flatrender.flatrender.test",  # the default tenant by slug: the acme key is another tenant's
    "nobody.example",
    "[::1]",
    "[::1]:80",
    "[fe80::1%eth0]",
    "[::1",
    "127.0.0.1",
    "bad host!",
    "",
    ":80",
    "xn--",
    "a." * 130,
    "v\u00eddeos.acme.test",
    "acme.flatrender.test\u3002",
]
_host = st.one_of(
    st.sampled_from(_HOSTS).map(lambda h: h.encode("utf-8")),
    st.tuples(st.sampled_from(_HOSTS[:3]), st.sampled_from(_ODD)).map(
        lambda t: t[0].encode()[:4] + t[1] + t[0].encode()[4:]
    ),
)

_SEGMENTS = [
    "public",
    "v1",
    "renders",
    "embed",
    "opt",
    "x",
    "42",
    "",
    ".",
    "..",
    "%2e",
    "%2E%2e",
    ".%2e",
    "%2e.",
    "..%2f",
    "a%2fb",
    "%00",
    "%",
    "%zz",
    "%25",
    ";x=1",
    "\u00e9",
    "\x7f",
    "\xff",
    " ",
]
_segment = st.one_of(
    st.sampled_from(_SEGMENTS),
    st.text(alphabet="abcXYZ019-._~!$&'()*+,;=:@", max_size=6).filter(
        lambda s: not any(w in s for w in ECHO_SPECIAL)
    ),
)


@st.composite
def _path(draw: st.DrawFn) -> str:
    start = draw(
        st.sampled_from(["/public", "/v1/renders", "/opt", "/embed", "", "/public/..", "/"])
    )
    segments = draw(st.lists(_segment, max_size=6))
    path = start + "/" + "/".join(segments) if segments else start or "/"
    if draw(st.booleans()):
        path += "?" + draw(
            st.sampled_from(["a=1", "", "x=%2e%2e/", "?", "a=\u00e9", "k=" + "q" * 20])
        )
    if draw(st.integers(0, 9)) == 0:
        path += "#" + draw(st.sampled_from(["frag", "", "?q"]))
    return path


@st.composite
def _target(draw: st.DrawFn, host: bytes) -> bytes:
    kind = draw(st.integers(0, 19))
    path = draw(_path()).encode("utf-8", "surrogateescape")
    if kind < 14:
        return path
    if kind < 17:  # absolute-form, agreeing with Host or not
        scheme = draw(st.sampled_from([b"http", b"https", b"HTTP", b"ftp", b"ws"]))
        authority = host if draw(st.booleans()) else draw(_host)
        return scheme + b"://" + authority + (path if path.startswith(b"/") else b"/" + path)
    if kind == 17:
        return draw(st.sampled_from([b"*", b"videos.acme.test:443", b"", b"//x", b"public/x"]))
    return draw(st.binary(min_size=1, max_size=30).filter(lambda b: b"\r\n\r\n" not in b))


_CHUNKED_BODIES = [
    b"5\r\nhello\r\n0\r\n\r\n",
    b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n",
    b"0\r\n\r\n",
    b"0_2e\r\n\r\n",
    b"+5\r\nhello\r\n0\r\n\r\n",
    b"0x5\r\nhello\r\n0\r\n\r\n",
    b"-1\r\nhello\r\n0\r\n\r\n",
    b"FFFFFFFFFFFFFFFFF1\r\nhello\r\n0\r\n\r\n",
    b"5\nhello\n0\n\n",
    b"5\r\nhel\r\n0\r\n\r\n",
    b"5 \r\nhello\r\n0\r\n\r\n",
]
_TRANSFER_CODINGS = [
    b"chunked",
    b"Chunked ",
    b"CHUNKED",
    b"\tchunked",
    b"gzip, chunked",
    b"identity, chunked",
    b"chunked, identity",
    b"chunked, chunked",
    b"xchunked",
    b"chunked\x00",
    b"chunk\xffed",
]


@st.composite
def _framing(draw: st.DrawFn) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Framing fields and a body that never leaves the proxy waiting for bytes that will not
    come: a declared length is never longer than the body sent, a chunked body always ends
    (or breaks the parser)."""
    kind = draw(st.integers(0, 9))
    body = draw(st.binary(max_size=64))
    if kind <= 3:
        return [], b""
    if kind <= 5:
        return [(b"Content-Length", str(len(body)).encode())], body
    if kind == 6:
        odd = draw(
            st.sampled_from(
                [b"+5", b"5, 5", b" 5", b"0x5", b"-1", b"5 5", b"99999999999999999999", b""]
            )
        )
        return [(b"Content-Length", odd)], b"hello" + body
    if kind == 7:
        lengths = draw(st.lists(st.integers(0, 5), min_size=2, max_size=3))
        return [(b"Content-Length", str(n).encode()) for n in lengths], b"hello" + body
    chunked = draw(st.sampled_from(_CHUNKED_BODIES))
    fields = [
        (b"Transfer-Encoding", c)
        for c in draw(st.lists(st.sampled_from(_TRANSFER_CODINGS), min_size=1, max_size=2))
    ]
    if kind == 9:  # both framings, in either order
        cl = (b"Content-Length", str(len(chunked)).encode())
        fields = [*fields, cl] if draw(st.booleans()) else [cl, *fields]
    return fields, chunked


@st.composite
def heads(draw: st.DrawFn) -> Head:
    """Request heads a hostile client might send; mostly well-formed around one odd part."""
    method = draw(
        st.one_of(
            st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]),
            st.sampled_from([b"get", b"CONNECT", b"TRACE", b"PRI", b"G\x00T", b"GET ", b"\xff"]),
        )
    )
    host = draw(_host)
    target = draw(_target(host))
    version = draw(
        st.sampled_from(
            [b"HTTP/1.1"] * 6
            + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"http/1.1", b"HTTP/1.1 "]
        )
    )
    fields: list[tuple[bytes, bytes]] = []
    for _ in range(draw(st.sampled_from([1] * 8 + [0, 2]))):
        fields.append((draw(st.sampled_from([b"Host", b"host", b"HOST"])), host))
    fields += draw(st.lists(st.tuples(_name, _value), max_size=6))
    framing, body = draw(_framing())
    fields += framing
    fields = draw(st.permutations(fields)) if draw(st.booleans()) else fields
    return Head(method, target, version, fields, body)


# --------------------------------------------------------------------------- pure functions


@dataclass(frozen=True)
class _Route:
    prefix: str


_ROUTES = RouteTable(_Route(p) for p in ("/public", "/v1/renders", "/opt", "/embed/"))
_TRUSTED = [ipaddress.ip_network("127.0.0.1/32")]
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def _all(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in headers if n.lower() == name]


def check_pure(p: Parsed) -> None:
    """Drive the head through every pure function the pipeline applies to it. Each returns a
    well-formed result or raises its documented error (BadHost, BadTarget); nothing else."""
    headers = p.headers
    # core.framing: a reason or None; None only for no Transfer-Encoding or exactly "chunked".
    if p.version is not None:
        te = _all(headers, "transfer-encoding")
        problem = framing_problem(p.version, te)
        if problem is None:
            codings = [c.strip(" \t").lower() for v in te for c in v.split(",")]
            assert te == [] or (codings == ["chunked"] and p.version >= (1, 1))
        else:
            assert isinstance(problem, str) and problem
    # core.hosts: a normalised host or BadHost.
    hosts = _all(headers, "host")
    for raw in hosts:
        try:
            host = normalize_host(raw)
        except BadHost:
            continue
        assert host.isascii() and host == host.lower() and host == host.strip()
        assert normalize_host(host) == host  # idempotent
        if host.startswith("["):
            assert host.endswith("]")
        else:
            assert len(host) <= 253 and all(_LABEL.fullmatch(x) for x in host.split("."))
        assert classify_host(host, PLATFORM).kind in ("slug", "platform", "reserved", "other")
    # core.paths: (resolved path, query) or BadTarget.
    try:
        path, query = split_target(p.target, hosts[0] if hosts else "")
    except BadTarget:
        pass
    else:
        assert path.startswith("/") and "?" not in path and "#" not in path + query
        assert not any(segment in _DOTS for segment in path.split("/"))
        assert resolve_dot_segments(path) == path
        _ROUTES.match(path)
    # core.forwarding: filters keep a subsequence with nothing hop-by-hop, spoofable or
    # unsendable; the client address and request id are always usable.
    named = connection_named(headers)
    for kept in (request_headers_to_forward(headers), response_headers_to_return(headers)):
        it = iter(headers)
        assert all(h in it for h in kept)
        for name, value in kept:
            low = name.lower()
            assert low not in _HOP and low not in named
            assert not low.startswith(("proxy-", "x-flatrender-"))
            value.encode("utf-8")  # what aiohttp's writer sends unaltered
    for name, _ in request_headers_to_forward(headers):
        assert name.lower() not in _NEVER_UPSTREAM | {"host", "content-length", "x-request-id"}
    xff = _all(headers, "x-forwarded-for")
    for peer in ("127.0.0.1", "192.0.2.7"):
        client, forwarded = client_address(peer, ", ".join(xff) if xff else None, _TRUSTED)
        ipaddress.ip_address(client)
        assert forwarded.endswith(peer)
    rid = request_id((_all(headers, "x-request-id") or [None])[0])
    assert _UUID.fullmatch(rid)
    # core.apikeys: a token or None, never an exception; parse_key only takes the format.
    authorization = (_all(headers, "authorization") or [None])[0]
    x_api_key = (_all(headers, "x-api-key") or [None])[0]
    token = presented_key(authorization, x_api_key)
    for value in _all(headers, "authorization"):
        key = bearer_key(value)
        assert key is None or key.startswith("fr_")
    if token is not None:
        parsed = parse_key(token)
        if parsed is not None:
            assert token.isascii() and len(parsed.prefix) == PREFIX_LEN
            assert re.fullmatch(r"[0-9a-f]{64}", parsed.hash)
    # core.cors: an origin in canonical form or None; a preflight's headers or None.
    for origin in _all(headers, "origin"):
        canon = normalize_origin(origin)
        assert canon is None or normalize_origin(canon) == canon
        for method in _all(headers, "access-control-request-method"):
            answer = preflight_headers(origin, method, None)
            assert answer is None or answer["Access-Control-Allow-Methods"] == method


# --------------------------------------------------------------------------- the wire


@dataclass
class Answer:
    status: int
    reason: bytes
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


def exchange(port: int, data: bytes, *, head_only: bool, timeout: float = 8.0) -> Answer | None:
    """Send ``data`` on a fresh connection and read the first final answer (interim 1xx are
    skipped). None when the server closes without answering. Bounded by ``timeout``."""
    end = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        # The server may refuse before reading everything: then read its answer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        buf = b""

        def more() -> bool:
            nonlocal buf
            assert time.monotonic() < end, f"no complete answer within {timeout}s: {buf[:200]!r}"
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                chunk = b""
            buf += chunk
            return bool(chunk)

        while True:
            while b"\r\n\r\n" not in buf:
                if not more():
                    assert not buf, f"the server closed mid-head: {buf[:200]!r}"
                    return None
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            m = re.fullmatch(rb"HTTP/(\d)\.(\d) (\d{3}) ?(.*)", lines[0])
            assert m, f"not an HTTP status line: {lines[0][:100]!r}"
            status = int(m.group(3))
            headers = []
            for line in lines[1:]:
                name, sep, value = line.partition(b":")
                assert sep and name and name == name.strip(), f"bad field line {line!r}"
                headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
            if 100 <= status < 200:
                continue
            answer = Answer(status, m.group(4), headers, b"")
            break
        length = answer.header("Content-Length")
        te = (answer.header("Transfer-Encoding") or "").lower()
        if head_only or status in (204, 304):
            return answer
        if length is not None:
            assert length.isdigit(), length
            while len(buf) < int(length):
                if not more():
                    break  # cut short: the caller sees a short body
            answer.body = buf[: int(length)]
        elif "chunked" in te:
            body = b""
            while True:
                while b"\r\n" not in buf:
                    if not more():
                        answer.body = body
                        return answer
                size_line, _, buf = buf.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    break
                while len(buf) < size + 2:
                    if not more():
                        break
                body, buf = body + buf[:size], buf[size + 2 :]
            answer.body = body
        else:
            while more():
                pass
            answer.body = buf
        return answer


def check_answer(answer: Answer | None, *, head_only: bool = False) -> None:
    """What every answer to any head must be. Proxy-made errors are the contract's JSON; a 200
    from the echo upstream shows what went upstream, and that must be clean."""
    assert answer is not None, "the proxy closed the connection without answering"
    assert answer.status != 500, f"internal error: {answer.body[:300]!r}"
    if answer.status >= 400:
        assert (answer.header("Content-Type") or "").startswith("application/json"), answer
        if head_only:  # the answer to HEAD has the JSON's headers and no body
            uuid.UUID(answer.header("X-Request-Id"))
            return
        error = json.loads(answer.body)["error"]
        assert set(error) == {"code", "message", "request_id"}, error
        assert re.fullmatch(r"[a-z_]+", error["code"]), error
        assert answer.header("X-Request-Id") == error["request_id"]
        uuid.UUID(error["request_id"])
        return
    if answer.status != 200 or not answer.body.startswith(b'{"method"'):
        return
    echoed = json.loads(answer.body)  # what the upstream received
    upstream = [(k, v) for k, v in echoed["headers"]]
    names = [k.lower() for k, _ in upstream]
    # A key presented as CONTRACT §5 says (Bearer or X-API-Key) never goes upstream. (The
    # same characters in some other field are that field's data, forwarded like any other.)
    for name, value in upstream:
        if name.lower() == "authorization" and value.split(None, 1)[:1] in (["Bearer"], ["bearer"]):
            assert DEMO_KEY not in value and DEMO_TEST_KEY not in value, "a raw key went upstream"
    assert not set(names) & _NEVER_UPSTREAM, names
    assert not ("content-length" in names and "transfer-encoding" in names), names
    assert all(v == "chunked" for k, v in upstream if k.lower() == "transfer-encoding")
    for name in ("x-request-id", "x-forwarded-for", "x-forwarded-host", "x-flatrender-tenant-id"):
        assert names.count(name) == 1, (name, names)
    mine = {k.lower(): v for k, v in upstream if k.lower().startswith("x-flatrender-")}
    assert len(mine) == sum(n.startswith("x-flatrender-") for n in names), "duplicated"
    assert mine["x-flatrender-tenant-id"] in (ACME_ID, DEFAULT_ID)
    assert mine["x-flatrender-tenant-slug"] in ("acme", "flatrender")
    assert set(mine) <= {
        "x-flatrender-tenant-id",
        "x-flatrender-tenant-slug",
        "x-flatrender-api-key-id",
        "x-flatrender-key-environment",
        "x-flatrender-scopes",
    }, mine
    if "x-flatrender-api-key-id" in mine:
        assert mine["x-flatrender-api-key-id"] in KEY_IDS
    path = echoed["path"]
    assert path.startswith("/") and resolve_dot_segments(path) == path, path
    if path == "/v1/renders" or path.startswith("/v1/renders/"):
        assert "x-flatrender-api-key-id" in mine, "an api_key route was served without a key"
    assert _UUID.fullmatch(dict((k.lower(), v) for k, v in upstream)["x-request-id"])


# --------------------------------------------------------------------------- the corpus

CORPUS = Path(__file__).resolve().parent / "corpus"


@dataclass
class Seed:
    """A corpus file: ``# expect: STATUS [code]`` and ``# note`` lines, then the head, one
    field line per text line, an empty line, and the body on the following line(s). Bytes
    outside printable ASCII are written as Python escapes (``\\r``, ``\\x00``); a line break
    inside a field is ``\\n`` within its line. Without the empty line the bytes are sent
    unterminated, as written."""

    name: str
    data: bytes
    status: int | None = None
    code: str | None = None
    notes: list[str] = field(default_factory=list)


def _unescape(text: str) -> bytes:
    return codecs.escape_decode(text.encode("ascii"))[0]  # type: ignore[no-any-return]


def _escape(data: bytes) -> str:
    out = []
    for c in data:
        if c == 0x5C:
            out.append("\\\\")
        elif c == 0x0D:
            out.append("\\r")
        elif c == 0x0A:
            out.append("\\n")
        elif c == 0x09:
            out.append("\\t")
        elif 0x20 <= c <= 0x7E:
            out.append(chr(c))
        else:
            out.append(f"\\x{c:02x}")
    return "".join(out)


def load_seed(path: Path) -> Seed:
    text = path.read_text(encoding="ascii")
    text = text[:-1] if text.endswith("\n") else text
    lines = text.split("\n")
    seed = Seed(path.stem, b"")
    while lines and lines[0].startswith("#"):
        comment = lines.pop(0)[1:].strip()
        if comment.startswith("expect:"):
            status, *code = comment[len("expect:") :].split()
            seed.status, seed.code = int(status), (code[0] if code else None)
        else:
            seed.notes.append(comment)
    if "" in lines:
        cut = lines.index("")
        head = b"\r\n".join(_unescape(line) for line in lines[:cut])
        seed.data = head + b"\r\n\r\n" + b"".join(_unescape(line) for line in lines[cut + 1 :])
    else:
        seed.data = b"\r\n".join(_unescape(line) for line in lines)
    return seed


def dump_seed(data: bytes, expect: str | None = None, notes: tuple[str, ...] = ()) -> str:
    """The corpus-file text for ``data`` (what a failing fuzz example prints, to keep)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    lines = [f"# expect: {expect}"] if expect else []
    lines += [f"# {n}" for n in notes]
    lines += [_escape(line) for line in head.split(b"\r\n")]
    if sep:
        lines += ["", _escape(body)] if body else [""]
    return "\n".join(lines) + "\n"


def seeds() -> list[Path]:
    return sorted(CORPUS.glob("*.txt"))
