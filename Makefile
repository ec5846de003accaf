# nl_detectron: `make demo` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# 1: let the environment see the system's packages (e.g. an official Detectron2 built from source).
SYSTEM_SITE_PACKAGES ?= 0
# A Detectron2 source tree or tarball (e.g. a clone of its main branch): build the official
# Detectron2 from it, with its C++ extension, instead of the registry v0.6 build.
DETECTRON2_SOURCE ?=
# 0: build DETECTRON2_SOURCE as it is, without the compatibility fixes that an older source needs
# on the pinned stack (by default they are applied where it needs them; README, "Support matrix").
DETECTRON2_SOURCE_FIXES ?= 1
PY := $(VENV)/bin/python
READY := $(VENV)/.ready
# What the environment's Detectron2 was built from; a change rebuilds the environment.
SOURCE_STAMP := $(VENV).detectron2-source
ENV_INPUTS := requirements/constraints.txt requirements/dev.txt requirements/no-deps.txt setup.py \
	tools/provision_detectron2.py tools/setup_env.sh $(SOURCE_STAMP)
PYTEST_ARGS ?=
# `make test-main`: the suite on official Detectron2 main, in its own environment.
MAIN_VENV ?= .venv-main
MAIN_SOURCE := $(or $(DETECTRON2_SOURCE),$(wildcard ../shared/third_party/detectron2-02b5c4e.tar.gz))

.PHONY: env test test-fast test-main demo-main main-source lint format demo demo-seeds evidence \
	benchmark gpu-wheels gpu-check clean distclean FORCE

env: $(READY)

$(READY): $(ENV_INPUTS)
	@DETECTRON2_SOURCE="$(DETECTRON2_SOURCE)" DETECTRON2_SOURCE_FIXES="$(DETECTRON2_SOURCE_FIXES)" \
		tools/setup_env.sh "$(PYTHON)" "$(VENV)" "$(SYSTEM_SITE_PACKAGES)"

# Rewritten only when DETECTRON2_SOURCE is given and it (or DETECTRON2_SOURCE_FIXES) differs from
# what the environment was built from, so that only then the environment is rebuilt (without it,
# the environment keeps its own).
SOURCE_SPEC := $(DETECTRON2_SOURCE) fixes=$(DETECTRON2_SOURCE_FIXES)
$(SOURCE_STAMP): FORCE
	@if [ -n "$(DETECTRON2_SOURCE)" ]; then \
		echo "$(SOURCE_SPEC)" | cmp -s - $@ 2>/dev/null || echo "$(SOURCE_SPEC)" > $@; \
	elif [ ! -e $@ ]; then touch $@; fi

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

main-source:
	@if [ -z "$(MAIN_SOURCE)" ]; then \
		echo "make $(MAKECMDGOALS): no Detectron2 source. Set DETECTRON2_SOURCE to a clone of" \
			"https://github.com/facebookresearch/detectron2 (its main branch) or a tarball of one."; \
		exit 1; \
	fi

test-main: main-source
	$(MAKE) test VENV=$(MAIN_VENV) DETECTRON2_SOURCE=$(abspath $(MAIN_SOURCE))

demo-main: main-source
	$(MAKE) demo VENV=$(MAIN_VENV) DETECTRON2_SOURCE=$(abspath $(MAIN_SOURCE)) \
		DEMO_OUTPUT=output/demo_main DEMO_HOST=main

DEMO_OUTPUT ?= output/demo
DEMO_HOST ?= v0.6
demo: $(READY)
	$(PY) tools/train_net.py --config-file configs/quickstart/mask_rcnn_nl_shapes.yaml \
		OUTPUT_DIR $(DEMO_OUTPUT)
	$(PY) tools/demo_figures.py $(DEMO_OUTPUT) --output $(DEMO_OUTPUT)
	@$(PY) tools/demo_result.py $(DEMO_OUTPUT) --host $(DEMO_HOST)

# Baseline, GC, NL and DNL trained on every variant of the context data, 2 seeds, and in the
# box-branch recipe on the pairwise variant and its local control: box / mask AP, gains,
# attention statistics and maps in output/evidence (docs/evidence.md). 48 runs of 4-7 min on 2
# cores; finished runs are reused, so it can be stopped and resumed.
evidence: $(READY)
	$(PY) benchmarks/benchmark_context.py --output output/evidence
	$(PY) benchmarks/benchmark_context.py --output output/evidence --variants pair pair_local \
		--models baseline_box_branch gc_box_branch nl_box_branch dnl_box_branch

benchmark: $(READY)
	$(PY) benchmarks/benchmark_non_local_block.py

# The demo's config with seeds 0-4 (seeds stand in for other CPUs' rounding): each run's AP, the
# median and the range (README). Resumable: finished seeds are reused. About 17 min on 2 cores.
demo-seeds: $(READY)
	$(PY) benchmarks/benchmark_demo_seeds.py

# A GPU machine without a package index (a cluster node, a lent cloud GPU): `make gpu-wheels`
# here fetches and builds the wheels of what it lacks (Detectron2 and its pure-Python stack,
# about 2 MB, for its Python GPU_PYTHON_VERSION) into .gpu/wheels; there, with the repository and
# .gpu copied over, `make gpu-check` installs them beside its own PyTorch and runs the GPU check
# (tools/gpu_check.py; BENCHMARKS.md, "GPU").
GPU_PYTHON ?= python3
GPU_PYTHON_VERSION ?= 3.12
GPU_CHECK_OUTPUT ?= output/gpu_check
gpu-wheels: $(READY)
	$(PY) tools/gpu_wheels.py --output .gpu/wheels --python-version $(GPU_PYTHON_VERSION)

gpu-check:
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --upgrade \
		--target .gpu/site .gpu/wheels/*.whl
	PYTHONPATH=$(CURDIR)/.gpu/site:$(CURDIR) $(GPU_PYTHON) tools/gpu_check.py \
		--output $(GPU_CHECK_OUTPUT)

clean:
	rm -rf output .pytest_cache .ruff_cache build *.egg-info

distclean: clean
	rm -rf $(VENV) $(VENV).detectron2-source $(MAIN_VENV) $(MAIN_VENV).detectron2-source \
		datasets/generated .gpu
