"""CORS in a real browser (CONTRACT §4): headless Chromium loads a page from an allowed origin
and from a refused one; each page fetches through a real proxy process to the echo upstream.

Chromium is driven with ``--dump-dom``: it loads the page, lets the page's script run under
``--virtual-time-budget`` (virtual time does not advance while a fetch is in flight, so the
fetches finish before the budget runs out), then prints the serialised DOM on stdout. The script
writes one JSON line per probe into the DOM, which the test reads back. No driver library, no
DevTools socket; every Chromium process is bounded by a timeout.

How this works on loopback:

- ``--host-resolver-rules`` maps ``*.acme.test`` and ``*.evil.test`` to 127.0.0.1, so real
  cross-origin host names (the tenant is resolved from ``videos.acme.test``) never leave the
  machine; the browser still keeps the port in the origin, so the allowed origin is
  ``http://www.acme.test:<page port>`` and that exact string is the tenant's allowed_origins entry.
- Plain http works: ``fetch`` with credentials needs no secure context, and as the page itself
  is served from a loopback address, Chromium's Private/Local Network Access checks (which gate
  requests from public to private or loopback addresses) do not apply: loopback to loopback.
- Chromium refuses a handful of "unsafe" ports (ERR_UNSAFE_PORT: 6000, 6665-6669, 10080, ...),
  all below 10081; the ports we use are kernel-assigned ephemeral ones, checked to be above that.
- The background-networking flags keep Chromium from calling Google services, which this closed
  network refuses; ``--disable-dev-shm-usage`` because containers often have a small /dev/shm.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import os
import re
import secrets
import shutil
import signal
import string
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.procs import Echo, Proxy, start_proxy, stop, write_config

ACME = "aaaaaaaa-0000-0000-0000-00000000c0de"
DEFAULT = "00000000-0000-0000-0000-000000000001"
ALPHABET = string.ascii_letters + string.digits
API_HOST = "videos.acme.test"
CHROMIUM_TIMEOUT_S = 60.0
MAX_UNSAFE_PORT = 10080  # highest port on Chromium's restricted list (net/base/port_util.cc)

# The page: two probes against the proxy, then a marker. ``public`` is a simple request (no
# preflight: the browser sends it and then decides whether the page may read the answer);
# ``keyed`` sends Authorization and X-Request-Id, so the browser preflights it first.
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>cors probe</title></head>
<body>
<pre id="public">PENDING</pre>
<pre id="keyed">PENDING</pre>
<pre id="done"></pre>
<script>
const API = "http://__API_HOST__:__PROXY_PORT__";
async function probe(id, url, init) {
  const out = document.getElementById(id);
  try {
    const res = await fetch(url, init);
    const body = await res.json();
    out.textContent = JSON.stringify({
      outcome: "READ:" + res.status + ":" + body.path,
      origin_seen: (body.headers.find(h => h[0].toLowerCase() === "origin") || [])[1] || null,
      exposed_request_id: res.headers.get("X-Request-Id"),
      exposed_remaining: res.headers.get("X-RateLimit-Remaining"),
    });
  } catch (e) {
    out.textContent = JSON.stringify({outcome: "BLOCKED:" + e.name + ":" + e.message});
  }
}
(async () => {
  await probe("public", API + "/public/x", {credentials: "include"});
  await probe("keyed", API + "/v1/renders/42", {
    credentials: "include",
    headers: {"Authorization": "Bearer __KEY__", "X-Request-Id": "__RID__"},
  });
  document.getElementById("done").textContent = "DONE";
})();
</script>
</body></html>
"""


@dataclass
class Site:
    port: int
    proxy: Proxy
    echo: Echo


def _mint() -> str:
    return "fr_live_" + "".join(secrets.choice(ALPHABET) for _ in range(40))


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        # Not a skip: this test is the only browser-level proof of §4.
        pytest.fail(
            "chromium is not installed: run scripts/ensure-test-servers.sh "
            "(or apt-get install chromium)",
            pytrace=False,
        )
    return path


class _PageServer(ThreadingHTTPServer):
    daemon_threads = True
    page: bytes = b""


class _PageHandler(BaseHTTPRequestHandler):
    server: _PageServer

    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/page.html":
            self.send_error(404)
            return
        rid = str(uuid.uuid4())  # one per page load: the test asks the upstream about it
        body = self.server.page.replace(b"__RID__", rid.encode())
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def page_server() -> Iterator[_PageServer]:
    server = _PageServer(("127.0.0.1", 0), _PageHandler)
    thread = threading.Thread(target=server.serve_forever, name="cors-pages", daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def site(
    echo: Echo, page_server: _PageServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Site]:
    d = tmp_path_factory.mktemp("browser_cors")
    page_port = page_server.server_address[1]
    key = _mint()
    tenants = d / "tenants.toml"
    tenants.write_text(
        f"""
[[tenants]]
id = "{DEFAULT}"
slug = "flatrender"
status = "Active"

[[tenants]]
id = "{ACME}"
slug = "acme"
status = "Active"
custom_domain = "{API_HOST}"
domain_verified = true
allowed_origins = ["http://www.acme.test:{page_port}"]

[[keys]]
id = "{uuid.uuid5(uuid.NAMESPACE_DNS, "browser-cors")}"
tenant = "acme"
key_prefix = "{key[:12]}"
key_hash = "{hashlib.sha256(key.encode()).hexdigest()}"
scopes = ["renders:*"]
"""
    )
    config = write_config(
        d / "edge.toml",
        tenancy={"embedded_file": str(tenants), "platform_domains": ["flatrender.test"]},
        upstreams={"render-api": {"urls": [echo.url]}},
        routes=[
            {
                "prefix": "/v1/renders",
                "upstream": "render-api",
                "auth": "api_key",
                "scopes": {"GET": "renders:read"},
            },
            {"prefix": "/public", "upstream": "render-api", "auth": "none"},
        ],
    )
    proxy = start_proxy(config)
    try:
        for port in (page_port, proxy.port):
            assert port > MAX_UNSAFE_PORT, f"port {port} may be on Chromium's unsafe-port list"
        page_server.page = (
            PAGE.replace("__API_HOST__", API_HOST)
            .replace("__PROXY_PORT__", str(proxy.port))
            .replace("__KEY__", key)
            .encode()
        )
        yield Site(page_port, proxy, echo)
    finally:
        stop(proxy.proc)


def _upstream_count(echo: Echo, rid: str) -> int:
    with urllib.request.urlopen(f"{echo.url}/__count/{rid}", timeout=5) as r:
        count: int = json.load(r)["count"]
        return count


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """Kill the Chromium we started and its helpers (its own session, so its own group)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def _load_pages(urls: list[str]) -> list[str]:
    """Dump each page's DOM after its script ran; the browsers run side by side."""
    chromium = _chromium()
    procs: list[subprocess.Popen[str]] = []
    with contextlib.ExitStack() as cleanup:
        for url in urls:
            profile = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="cors-chromium-"))
            proc = subprocess.Popen(
                [
                    chromium,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    f"--user-data-dir={profile}",
                    "--host-resolver-rules=MAP *.acme.test 127.0.0.1, MAP *.evil.test 127.0.0.1",
                    "--virtual-time-budget=10000",
                    "--dump-dom",
                    url,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                # Crashpad writes under $XDG_CONFIG_HOME whatever --user-data-dir says: keep it
                # in the throwaway profile too.
                env={**os.environ, "XDG_CONFIG_HOME": profile, "XDG_CACHE_HOME": profile},
                start_new_session=True,
            )
            procs.append(proc)
            cleanup.callback(_kill_group, proc)  # runs before the profile is removed
        end = time.monotonic() + CHROMIUM_TIMEOUT_S
        doms = []
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"chromium did not finish within {CHROMIUM_TIMEOUT_S}s", pytrace=False)
            if proc.returncode != 0 or 'id="done">DONE<' not in out:
                pytest.fail(
                    f"chromium exited {proc.returncode} without a finished page\n"
                    f"stdout: {out[-2000:]}\nstderr: {err[-3000:]}",
                    pytrace=False,
                )
            doms.append(out)
        return doms


def _probe(dom: str, probe_id: str) -> dict[str, str | None]:
    m = re.search(rf'<pre id="{probe_id}">(.*?)</pre>', dom, re.S)
    assert m, f"no {probe_id} result in the dumped DOM:\n{dom}"
    result: dict[str, str | None] = json.loads(html.unescape(m.group(1)))
    return result


def _request_id(dom: str) -> str:
    m = re.search(r'"X-Request-Id": "([0-9a-f-]{36})"', html.unescape(dom))
    assert m, "the page carries its request id"
    return m.group(1)


def test_allowed_origin_reads_and_refused_origin_is_blocked(site: Site) -> None:
    allowed_origin = f"http://www.acme.test:{site.port}"
    allowed, refused = _load_pages(
        [f"{allowed_origin}/page.html", f"http://www.evil.test:{site.port}/page.html"]
    )

    # Allowed origin, simple request with credentials: readable, with the exposed headers.
    public = _probe(allowed, "public")
    assert public["outcome"] == "READ:200:/public/x"
    assert public["origin_seen"] == allowed_origin
    assert public["exposed_request_id"]

    # Allowed origin, preflighted request (Authorization): the preflight passed, the key
    # authenticated, and the rate-limit headers are exposed to the page.
    keyed = _probe(allowed, "keyed")
    allowed_rid = _request_id(allowed)
    assert keyed["outcome"] == "READ:200:/v1/renders/42"
    assert keyed["exposed_request_id"] == allowed_rid
    assert keyed["exposed_remaining"] is not None

    # Refused origin: the simple request is served without CORS headers and the browser
    # withholds it; the preflight is refused (403), so the keyed request is never sent.
    for probe_id in ("public", "keyed"):
        assert _probe(refused, probe_id)["outcome"] == "BLOCKED:TypeError:Failed to fetch"

    # The upstream saw the allowed page's keyed request once (the preflight never reaches it)
    # and the refused page's not at all.
    assert _upstream_count(site.echo, allowed_rid) == 1
    assert _upstream_count(site.echo, _request_id(refused)) == 0
