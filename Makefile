# The two commands: `make run` and `make test`. Both create .venv and install everything themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PG_BIN := /usr/lib/postgresql/15/bin
PORT ?= 8080

.PHONY: run test e2e bench migrate admin lint pg-binaries

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -m venv $(VENV) || (apt-get update -q && apt-get install -y -q python3-venv && $(PYTHON) -m venv $(VENV))
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[test]'
	@touch $@

run: $(VENV)/.installed
	$(PY) -m control run --port $(PORT)

migrate: $(VENV)/.installed
	$(PY) -m control migrate

admin: $(VENV)/.installed
	$(PY) -m control create-admin

pg-binaries:
	@test -x $(PG_BIN)/initdb || (apt-get update -q && apt-get install -y -q postgresql-15)

test: $(VENV)/.installed pg-binaries
	$(PY) -m pytest -q -m "not e2e"

e2e: $(VENV)/.installed pg-binaries
	$(PY) -m pytest -q -m e2e

bench: $(VENV)/.installed
	$(PY) -m bench $(BENCH_ARGS)
