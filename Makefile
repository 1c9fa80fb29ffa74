# Two commands set everything up on a fresh machine:
#   make run    install everything, then run the main job on the embedded default (params.yaml)
#   make test   install everything, then run the test suite (what .ci/run calls)
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum requirements.lock pyproject.toml | sha256sum | cut -c1-12)

.PHONY: setup run test repro lock bench clean

setup: $(STAMP) /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | { grep -v "^WARNING: Location" || true; }
	rm -f $(VENV)/.installed-* && touch $@

# Debian ships Fashion-MNIST (the embedded default data set) as a package.
/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz:
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q dataset-fashion-mnist >/dev/null

run: setup
	$(VENV)/bin/modelpress run --params params.yaml

test: setup
	$(PY) -m pytest -q

# The same pipeline through DVC (stages call `modelpress stage NAME`).
repro: setup
	PATH=$(abspath $(VENV))/bin:$$PATH dvc repro

# Re-pin dependencies after editing requirements.in (uv resolves this stack in seconds).
lock:
	uv pip compile requirements.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 -o requirements.lock

bench: setup
	$(PY) bench/kmeans_bench.py
	$(PY) bench/run_bench.py

clean:
	rm -rf data/datasets data/teacher data/compress data/finetune data/model.mpk data/metrics.json mlruns
