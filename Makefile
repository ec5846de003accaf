# nl_detectron: `make demo` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# 1: let the environment see the system's packages (e.g. an official Detectron2 built from source).
SYSTEM_SITE_PACKAGES ?= 0
PY := $(VENV)/bin/python
READY := $(VENV)/.ready
ENV_INPUTS := requirements/constraints.txt requirements/dev.txt setup.py \
	tools/provision_detectron2.py tools/setup_env.sh
PYTEST_ARGS ?=

.PHONY: env test test-fast lint format demo benchmark clean distclean

env: $(READY)

$(READY): $(ENV_INPUTS)
	@tools/setup_env.sh "$(PYTHON)" "$(VENV)" "$(SYSTEM_SITE_PACKAGES)"

lint: $(READY)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(READY)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: $(READY) lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The edit loop: everything but the tests marked slow (whole training runs, benchmarks).
test-fast: $(READY) lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: $(READY)
	$(PY) tools/train_net.py --config-file configs/quickstart/mask_rcnn_nl_shapes.yaml OUTPUT_DIR output/demo
	$(PY) tools/demo_figures.py output/demo --output output/demo

benchmark: $(READY)
	$(PY) benchmarks/benchmark_non_local_block.py

clean:
	rm -rf output .pytest_cache .ruff_cache build *.egg-info

distclean: clean
	rm -rf $(VENV) datasets/generated
