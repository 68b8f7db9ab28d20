# The two commands: `make run` and `make test`. Both create .venv and install everything themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PG_BIN := /usr/lib/postgresql/15/bin
PORT ?= 8080

.PHONY: run test e2e bench bench-tools migrate admin lint pg-binaries edge-binaries code-server config-reference

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -m venv $(VENV) || (apt-get update -q && apt-get install -y -q python3-venv && $(PYTHON) -m venv $(VENV))
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[test]'
	@touch $@

# The dev containers run a real code-server once `make code-server` installed it (ZLH_LOCAL_IDE_COMMAND).
IDE_COMMAND_FILE := .cache/code-server/ide-command

run: $(VENV)/.installed
	ZLH_DEMO=$${ZLH_DEMO:-1} ZLH_LOCAL_IDE_COMMAND="$${ZLH_LOCAL_IDE_COMMAND:-$$(cat $(IDE_COMMAND_FILE) 2>/dev/null)}" \
		$(PY) -m control run --port $(PORT)

# A real VS Code in the browser for the embedded default: Node 24 + code-server from npm into .cache/.
code-server: $(VENV)/.installed
	@command -v npm >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q npm)
	$(PY) -m bench.agent.code_server_install

# docs/configuration.md from the settings object (tests fail when it is stale).
config-reference: $(VENV)/.installed
	$(PY) -m control config-reference

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

# Style, imports and bug patterns (ruff, line length 120) and types (mypy with the runtime packages installed).
lint: $(VENV)/.installed
	@$(PY) -m pip install -q -e '.[test,lint]'
	$(PY) -m ruff check gateway control storage bench tests
	$(PY) -m mypy gateway control storage

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
