# sela: `make run` (set up + run the main job on the embedded default), `make test` (set up + run the tests),
# `make test-fast` (set up + the tests not marked slow: the developer loop, under a minute).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 4200
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export PREFECT_API_URL := http://127.0.0.1:$(PORT)/api

.PHONY: run test test-fast setup lock browser server serve stop repro lint

setup: $(VENV)/.installed $(VENV)/.sela

# The exact environment from requirements.lock (--no-deps: nothing resolved here, nothing cached: disk is tight).
$(VENV)/.installed: requirements.lock
	@df -h --output=avail,target . | tail -n1 | awk '{print "setup: " $$1 " free on " $$2 " (the environment takes ~5.7 GB)"}'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-cache-dir --upgrade pip
	$(BIN)/pip install --quiet --no-cache-dir --no-deps -r requirements.lock
	touch $@

# sela itself, editable: the `sela` command (label registry). Pure Python: no compiler and no headers needed (the
# ingest's JPEG check is simplejpeg's wheel, pinned in requirements.lock).
$(VENV)/.sela: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

# Re-pin requirements.lock after changing requirements.txt: resolve in a scratch venv, freeze, leave triton out.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --no-cache-dir -r requirements.txt
	{ grep '^#' requirements.lock; .lock-venv/bin/pip freeze | grep -v -i '^triton=='; } > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf .lock-venv

server: setup
	@scripts/prefect-server.sh start $(PORT)

serve: server
	@scripts/prefect-serve.sh

# The flow's own log (epochs, relabels) streams from the serve process while --watch waits for the final state.
run: serve
	@tail -n0 -F $(PREFECT_HOME)/serve.log & tailer=$$!; \
	$(BIN)/prefect deployment run sela/full --watch; status=$$?; \
	kill $$tailer 2>/dev/null; exit $$status
	@$(BIN)/python -m flows.summary

stop:
	@scripts/prefect-serve.sh stop; scripts/prefect-server.sh stop $(PORT)

# The stages' flow runs report to the project's server (PREFECT_API_URL above), which must be up for them.
repro: server
	source $(BIN)/activate && dvc repro

lint: setup
	$(BIN)/ruff check .

# Debian's chromium renders the label report in a test (headless). apt needs root; CI runs as root.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] || { echo "install chromium (Debian: apt-get install chromium) or run as root"; exit 1; }; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; }

test: setup browser
	$(BIN)/ruff check .
	unset PREFECT_API_URL; $(BIN)/python -m pytest -q tests

# No browser, no whole-pipeline runs, no DVC round trips: what `pytest -m slow` selects is left to `make test` (CI).
test-fast: setup
	unset PREFECT_API_URL; $(BIN)/python -m pytest -q -m "not slow" tests
