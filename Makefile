# `make test` and `make demo` each install into a local venv first (.venv). The venv sees the system's packages,
# so a CUDA torch that is already installed is kept; torch==2.13.0 (the CPU wheel) is installed only where no
# torch can be imported.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.difftune-installed

.PHONY: install test lint demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/difftune quickstart --out outputs/quickstart

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
