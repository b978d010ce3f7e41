# powa-fleet: every target installs what it needs on a fresh Debian 12.
#   make demo   - a throwaway fleet (repository, 3 remotes, Redis, supervisord + web UI)
#   make test   - ruff, mypy and the test suite against real PostgreSQL/Redis/supervisord

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
APT_PACKAGES := postgresql-15 postgresql-15-powa postgresql-15-pg-stat-kcache \
	postgresql-15-pg-qualstats redis-server python3-venv \
	libpq-dev gcc python3-dev prometheus

.PHONY: test lint unit demo demo-clean bench system-deps runtime dev clean bytecode powa5

test: dev powa5
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

lint: dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# PostgreSQL 17 + PoWA 5 for the tests: a Debian 13 tree built once (cached in
# /var/cache/powa-fleet/trixie), or nothing on a host with PoWA 5 packages
powa5:
	scripts/powa5-tree.sh

# fast tests of pure logic, no services
unit: dev
	$(VENV)/bin/pytest tests/unit

# POWA=5: a PoWA 5 fleet (PostgreSQL 17 from Debian 13, see the powa5 target)
demo: runtime $(if $(filter 5,$(POWA)),powa5)
	$(VPY) -m collector.demo $(if $(POWA),--powa $(POWA))

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
runtime: system-deps $(VENV)/.runtime bytecode

# an editable install is never byte-compiled, and with PYTHONDONTWRITEBYTECODE set
# every worker would compile the package from source at each start
bytecode:
	@$(VPY) -m compileall -q collector
# plus the test and lint tools
dev: runtime $(VENV)/.dev

# editable as a path in a .pth (compat), not setuptools' import hook: the hook costs
# every python start of the fleet ~20 ms (pathlib, typing), hundreds of times over
EDITABLE := --config-settings editable_mode=compat -e

$(VENV)/.runtime: pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check $(EDITABLE) .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(VPY) -m pip install -q --disable-pip-version-check $(EDITABLE) '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
