# Every target bootstraps .venv itself from requirements.lock (exact pins) on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: venv lint test test-fast demo demo-containers bench ui image image-base image-cpu test-images clean

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
	$(PY) -m pytest -q -n 2 -m "not integration"

demo: $(STAMP)
	$(VENV)/bin/sam3pipe run --local profile=demo

bench: $(STAMP)
	$(PY) -m bench

# Prints the runs-table link (headline columns shown), then serves the local store.
UI_PORT ?= 5000
ui: $(STAMP)
	$(VENV)/bin/sam3pipe ui --port $(UI_PORT)

image:
	bash docker/build.sh

# Images without Docker Hub (docs/pipelines.md, "Images"): a Debian base from Debian packages (root,
# debootstrap, a running docker or podman; built once, kept), then the CPU image on it (docker's
# layer cache rebuilds only what a commit changed; built from git HEAD).
VERSION := $(shell grep -m1 '^version = ' pyproject.toml | cut -d'"' -f2)
BASE_IMAGE ?= localhost/sam3pipe-base:bookworm
CPU_IMAGE ?= localhost/sam3pipe-cpu:$(VERSION)
image-base:
	docker image inspect $(BASE_IMAGE) >/dev/null 2>&1 || SAM3PIPE_BASE_IMAGE=$(BASE_IMAGE) bash docker/base.sh

image-cpu: image-base
	SAM3PIPE_BASE_IMAGE=$(BASE_IMAGE) bash docker/build.sh cpu

# `make demo` with every component in a container of the CPU image (kfp.local's DockerRunner);
# DEMO_ARGS adds pipeline parameters, e.g. DEMO_ARGS=max_steps=40
DEMO_ARGS ?=
demo-containers: $(STAMP) image-cpu
	$(VENV)/bin/sam3pipe run --local --runner docker --set image=$(CPU_IMAGE) profile=demo $(DEMO_ARGS)

# the image tests (tests/docker), on the CPU image built from HEAD; `make test` skips them where no engine runs
test-images: $(STAMP) image-cpu
	SAM3PIPE_TEST_IMAGE=$(CPU_IMAGE) $(PY) -m pytest -q tests/docker

clean:
	rm -rf $(VENV) .sam3pipe .pytest_cache
