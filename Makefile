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

.PHONY: test lint unit demo demo-clean bench system-deps venv clean

test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# fast tests of pure logic, no services
unit: venv
	$(VENV)/bin/pytest -m "not slow" tests/unit

demo: venv
	$(VPY) -m collector.demo

demo-clean: venv
	$(VPY) -m collector.demo --clean

bench: venv
	$(VPY) benchmarks/run_all.py

system-deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s "$$p" >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

venv: system-deps $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
