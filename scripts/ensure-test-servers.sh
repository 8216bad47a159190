#!/usr/bin/env bash
# Make sure the binaries the tests start are installed: redis-server and PostgreSQL's
# initdb/postgres (tests/servers.py), chromium (tests/e2e/test_browser_cors.py, headless), caddy
# (tests/e2e/test_caddy_tls.py, the TLS front), haproxy (tests/e2e/test_haproxy_front.py, the
# PROXY protocol front) and promtool from Debian's prometheus package
# (tests/e2e/test_dashboards.py checks the alert rules with it).
# Quick no-op when they are. Installs with apt-get only as root; never enables
# or starts a system service (the tests run their own throwaway servers on random ports).
set -euo pipefail

have_redis() { command -v redis-server >/dev/null 2>&1; }
have_chromium() { command -v chromium >/dev/null 2>&1; }
have_caddy() { command -v caddy >/dev/null 2>&1; }
have_haproxy() { command -v haproxy >/dev/null 2>&1; }
have_promtool() { command -v promtool >/dev/null 2>&1; }
have_initdb() {
    command -v initdb >/dev/null 2>&1 && return 0
    local f
    for f in /usr/lib/postgresql/*/bin/initdb; do
        [ -x "$f" ] && return 0
    done
    return 1
}

missing=()
have_initdb || missing+=(postgresql)
have_redis || missing+=(redis-server)
have_chromium || missing+=(chromium)
have_caddy || missing+=(caddy)
have_haproxy || missing+=(haproxy)
have_promtool || missing+=(prometheus)
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-test-servers: missing ${missing[*]}; install them, e.g.:" >&2
    echo "  sudo apt-get install -y ${missing[*]}" >&2
    echo "(tests need redis-server, chromium, caddy, haproxy and promtool on PATH, and initdb/postgres in PATH or" >&2
    echo " /usr/lib/postgresql/*/bin)" >&2
    exit 1
fi

# Debian's maintainer scripts ask invoke-rc.d, which asks policy-rc.d: exit 101 means "do not
# start services", so installing creates no running cluster or redis. Only a policy-rc.d we
# created ourselves is removed again.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    created_policy=1
fi
cleanup() {
    if [ "$created_policy" -eq 1 ]; then
        rm -f "$policy"
    fi
}
trap cleanup EXIT

echo "ensure-test-servers: installing ${missing[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

if ! have_initdb || ! have_redis || ! have_chromium || ! have_caddy || ! have_haproxy \
    || ! have_promtool; then
    echo "ensure-test-servers: installed ${missing[*]} but initdb, redis-server, chromium," \
        "caddy, haproxy or promtool is still missing" >&2
    exit 1
fi
echo "ensure-test-servers: ok" >&2
