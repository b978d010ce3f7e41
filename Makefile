# powa-fleet: every target installs what it needs on a fresh Debian 12.
#   make demo   - a throwaway fleet (repository, 3 remotes, Redis, supervisord + web UI)
#   make test   - ruff, mypy and the test suite against real PostgreSQL/Redis/supervisord

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
APT_PACKAGES := postgresql-15 postgresql-15-powa postgresql-15-pg-stat-kcache \
	postgresql-15-pg-qualstats redis-server python3-venv

.PHONY: test lint unit demo demo-clean bench system-deps runtime dev clean

test: dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

lint: dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# fast tests of pure logic, no services
unit: dev
	$(VENV)/bin/pytest tests/unit

demo: runtime
	$(VPY) -m collector.demo

demo-clean: runtime
	$(VPY) -m collector.demo --clean

# the latest figures are in docs/benchmarks.md
bench: runtime
	$(VPY) -m benchmarks.snapshot_bench
	$(VPY) -m benchmarks.fleet_bench

system-deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s "$$p" >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

# what the fleet runs with (the demo needs no more)
runtime: system-deps $(VENV)/.runtime
# plus the test and lint tools
dev: runtime $(VENV)/.dev

$(VENV)/.runtime: pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
