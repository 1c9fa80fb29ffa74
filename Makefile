# Two commands set everything up on a fresh machine:
#   make run    install everything, then run the main job on the embedded default (params.yaml)
#   make test   install everything, then run the test suite (what .ci/run calls)
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum requirements.lock pyproject.toml setup.py | sha256sum | cut -c1-12)

.PHONY: setup run lint test test-fast repro lock bench clean

FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
# NO_APT=1: no root for apt-get; the run then fetches the data set from params.yaml's other sources.
setup: $(STAMP) $(if $(NO_APT),,$(FMNIST))

# uv (pinned in the lock) installs the lock: seconds from its cache.
# Where PYTHONDONTWRITEBYTECODE is set (CI images, containers) Python never writes .pyc files, so
# every process would compile torch, prefect and mlflow again (double the CPU of each `modelpress`
# start): there --compile-bytecode writes them at install, ~50 CPU-seconds once. Elsewhere Python
# writes the .pyc of what a process imports on first use, which costs the first run ~15 CPU-seconds,
# not the 50 of compiling every installed file.
UV_PIN := $(shell grep -m1 '^uv==' requirements.lock)
COMPILE := $(if $(PYTHONDONTWRITEBYTECODE),--compile-bytecode,)
$(STAMP): requirements.lock pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	test -x $(VENV)/bin/uv || $(PY) -m pip install -q --disable-pip-version-check "$(UV_PIN)" 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(VENV)/bin/uv pip install -q --system-certs $(COMPILE) --python $(PY) -r requirements.lock
	$(VENV)/bin/uv pip install -q --system-certs $(COMPILE) --python $(PY) --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $@

# Debian ships Fashion-MNIST (the embedded default data set) as a package.
$(FMNIST):
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q dataset-fashion-mnist >/dev/null

# ARGS: extra `modelpress run` arguments, e.g. make run ARGS="-S finetune.epochs=0.2"
run: setup
	$(VENV)/bin/modelpress run --params params.yaml $(ARGS)

# Static checks, all three even when one fails: ruff ([tool.ruff] in pyproject.toml), mypy on
# modelpress/ ([tool.mypy]) and the import contracts ([tool.importlinter]). lint-imports reads the
# files under modelpress/ and does not follow setup.py's package-dir, so it checks a temporary copy
# shaped like the installed package: flows/ and tasks/ as modelpress/flows and modelpress/tasks.
lint: setup
	@status=0; \
	$(VENV)/bin/ruff check . || status=1; \
	$(VENV)/bin/mypy || status=1; \
	tree=$$(mktemp -d); \
	cp -r modelpress pyproject.toml $$tree/ && cp -r flows $$tree/modelpress/flows && cp -r tasks $$tree/modelpress/tasks \
	  && (cd $$tree && $(abspath $(VENV))/bin/lint-imports --no-logo --no-cache) || status=1; \
	rm -rf $$tree; \
	exit $$status

# The static checks (seconds; ~40 s with mypy's cache empty, on one core) side by side with the
# unit tier, so that a broken core fails in about a minute, then the slow tiers. .ci/run runs this
# target. -O: each one's output in one piece.
# The slow tiers run on one more pytest-xdist worker than there are cores: their tests spend much
# of their time waiting on servers and subprocesses (tests/conftest.py gives each worker one
# torch thread and starts the longest tests first; tests that share a module fixture carry one
# xdist_group, so that one worker runs them).
# TEST_ARGS: extra pytest arguments for the slow tiers (.ci/run: --durations=25).
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
# The unit tier: one worker per core (one torch thread each): about 40 s on 2 cores instead of 60.
UNIT_WORKERS ?= $(shell nproc)
TEST_ARGS ?=
test: setup
	$(MAKE) --no-print-directory -j2 -O lint test-fast
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --tier pipeline --tier services $(TEST_ARGS)

# The unit tier: no server, no subprocess (tests/conftest.py TIERS).
test-fast: setup
	$(PY) -m pytest -q -n $(UNIT_WORKERS) --tier unit

# The same pipeline through DVC (stages call `modelpress stage NAME`).
repro: setup
	PATH=$(abspath $(VENV))/bin:$$PATH dvc repro

# Re-pin dependencies after editing requirements.in (uv resolves this stack in seconds).
lock: setup
	$(VENV)/bin/uv pip compile requirements.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 -o requirements.lock

bench: setup
	$(PY) bench/kmeans_bench.py
	$(PY) bench/run_bench.py

clean:
	rm -rf data/datasets data/teacher data/compress data/finetune data/model.mpk data/metrics.json mlruns
