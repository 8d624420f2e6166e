# Every target bootstraps .venv itself from requirements.lock (exact pins) on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: venv lint test test-fast demo bench ui image clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check uv==0.9.30
	$(UV) pip install --python $(PY) --compile-bytecode -r requirements.lock
	$(UV) pip install --python $(PY) --no-deps -e .
	touch $(STAMP)

# ruff (pinned in requirements.lock): lint rules and the format check, configured in pyproject.toml
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# two workers, each module on one of them (tests/conftest.py)
test: lint
	$(PY) -m pytest -q -n 2

# the unit tier: no servers, no child processes, no trainings (docs/testing.md)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

demo: $(STAMP)
	$(VENV)/bin/sam3pipe run --local

bench: $(STAMP)
	$(PY) -m bench

# Prints the runs-table link (headline columns shown), then serves the local store.
UI_PORT ?= 5000
ui: $(STAMP)
	$(VENV)/bin/sam3pipe ui --port $(UI_PORT)

image:
	bash docker/build.sh

clean:
	rm -rf $(VENV) .sam3pipe .pytest_cache
