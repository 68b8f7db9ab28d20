# The two commands: `make run` and `make test`. Both create .venv and install everything themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PG_BIN := /usr/lib/postgresql/15/bin
PORT ?= 8080

.PHONY: run test e2e bench bench-tools migrate admin lint pg-binaries edge-binaries

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -m venv $(VENV) || (apt-get update -q && apt-get install -y -q python3-venv && $(PYTHON) -m venv $(VENV))
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[test]'
	@touch $@

run: $(VENV)/.installed
	ZLH_DEMO=$${ZLH_DEMO:-1} $(PY) -m control run --port $(PORT)

migrate: $(VENV)/.installed
	$(PY) -m control migrate

admin: $(VENV)/.installed
	$(PY) -m control create-admin

pg-binaries:
	@test -x $(PG_BIN)/initdb || (apt-get update -q && apt-get install -y -q postgresql-15)

# PowerDNS, Prometheus and dig for tests/edge (installed unattended, their services not started).
edge-binaries: $(VENV)/.installed
	@$(PY) -m tests.edge.servers install

test: $(VENV)/.installed pg-binaries edge-binaries bench-tools
	$(PY) -m pytest -q -m "not e2e"

e2e: $(VENV)/.installed pg-binaries edge-binaries bench-tools
	$(PY) -m pytest -q -m e2e

# The bench suite's tools: nginx (the comparison proxy, and the load balancer of tests/cluster; its service is never
# started) and wrk.
bench-tools:
	@command -v nginx >/dev/null && command -v wrk >/dev/null && command -v curl >/dev/null || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx wrk curl)

# Full suite (~10 min); BENCH_ARGS="--quick" for the CI-sized run, "--json out.json --plot out.png" to keep results.
bench: $(VENV)/.installed bench-tools pg-binaries
	@$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m bench $(BENCH_ARGS)
