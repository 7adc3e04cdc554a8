# `make run` and `make test` do all set-up on a fresh Debian/Ubuntu machine.
VENV := .venv
PY := $(VENV)/bin/python
TEST_EXTRAS := [test,lint]
APT_PACKAGES := docker.io docker-registry skopeo containerd nginx apache2-utils chromium redis-server

.PHONY: run test test-deploy lint soak venv system-packages bench
# Two stamps in one venv: `make run` needs the runtime dependencies only; tests add the test and lint extras.
venv: $(VENV)/.installed
$(VENV)/.runtime $(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.$(if $(filter %/.installed,$@),$(TEST_EXTRAS))'
	touch $@

# Stop it with Ctrl-C (SIGTERM from a service manager works the same way).
run: $(VENV)/.runtime
	$(VENV)/bin/cargohold serve $(if $(CONFIG),--config $(CONFIG))

# pebble: the ACME CA of the TLS tests; docker-compose: checks deploy/'s compose files.
APT_PACKAGES += pebble docker-compose
# podman: one of the real clients the e2e tests pull with (tests/e2e/test_as_shipped.py).
APT_PACKAGES += podman

system-packages:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	fi

# ruff (rules, format) and mypy --strict: settings and per-module relaxations in pyproject.toml.
lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

test: system-packages venv
	$(PY) -m pytest tests -q --ignore=tests/deploy

# The container image and cargohold behind Traefik, for real (tests/deploy, docs/deploy.md): about 10 minutes
# the first time on a machine (the Debian base image is built once and kept), half that afterwards.
APT_PACKAGES += mmdebstrap
test-deploy: system-packages venv
	$(PY) -m pytest tests/deploy -q

# Heavy reliability variants (1,000 connections, long fault runs): `pytest -m soak`.
soak: system-packages venv
	$(PY) -m pytest tests/reliability -q -m soak -s

# Side-by-side figures against nginx + docker-registry (see docs/performance.md); BENCH_ARGS=--quick for a smoke run.
bench: system-packages venv
	$(PY) -m bench.run $(BENCH_ARGS)
