# FlatRender Edge — the two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint bench bench-workers bench-scale loadtest venv clean

# The venv is (re)built when pyproject.toml changes; a fresh clone needs nothing else. The load
# extra (locust) is installed too, so that the tests that import the load scripts run, not skip.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,load]'
	touch $(STAMP)

venv: $(STAMP)

# The proxy on the embedded default (no Postgres, no Redis) in front of the demo upstream.
run: venv
	@$(BIN)/python loadtests/echo_upstream.py --port 9001 & up=$$!; \
	trap 'kill $$up 2>/dev/null' EXIT INT TERM; \
	$(BIN)/python -m proxy serve

# Installs the postgres and redis-server binaries if missing; the tests start their own servers.
test: venv
	bash scripts/ensure-test-servers.sh
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The benchmark of the README's performance section (installs wrk from Debian when missing).
bench: venv
	bash scripts/ensure-test-servers.sh
	$(BIN)/python loadtests/bench.py

# The proxy with 2 workers on both cores (the load generator then shares them): how it scales.
bench-workers: venv
	bash scripts/ensure-test-servers.sh
	$(BIN)/python loadtests/bench.py --workers 2

# Cost as tenants, keys and traffic grow: 100,000 tenants and 1,000,000 keys seeded by SQL,
# warm/cold throughput, p99 on a full cache, GC pauses, memory, Postgres writes, a flood; ends
# with the SCALE line (loadtests/bench_scale.py; a few minutes).
bench-scale: venv
	bash scripts/ensure-test-servers.sh
	$(BIN)/python loadtests/bench_scale.py

# Realistic reseller traffic with locust against a local stack it starts itself (Postgres, Redis,
# echo upstream, proxy in database mode); reports in var/loadtest/, non-zero exit on a failed
# check. `make loadtest DURATION=120` runs longer.
DURATION ?= 30
loadtest: venv
	bash scripts/ensure-test-servers.sh
	$(BIN)/python loadtests/loadtest.py --duration $(DURATION)

lint: venv
	$(BIN)/ruff check proxy tests loadtests
	$(BIN)/ruff format --check proxy tests loadtests
	$(BIN)/mypy --strict proxy

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
