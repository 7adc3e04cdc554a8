# `make run` and `make test` do all set-up on a fresh Debian/Ubuntu machine.
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := docker.io docker-registry skopeo containerd nginx apache2-utils chromium redis-server

.PHONY: run test test-deploy soak venv system-packages bench
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: venv
	$(VENV)/bin/cargohold serve $(if $(CONFIG),--config $(CONFIG))

# pebble: the ACME CA of the TLS tests; docker-compose: checks deploy/'s compose files.
APT_PACKAGES += pebble docker-compose

system-packages:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	fi

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
