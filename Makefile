# `make test` and `make demo` each install into a local venv first (.venv). The venv sees the system's packages,
# so a CUDA torch that is already installed is kept; torch==2.13.0 (the CPU wheel) is installed only where no
# torch can be imported.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.difftune-installed
MAIN_STAMP := $(VENV)/.difftune-main-installed

.PHONY: install test lint demo clean chromium

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

# `make demo` needs only the main dependencies (no test, lint or app extras)
$(MAIN_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e .
	touch $(MAIN_STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The studio's browser test drives Debian Chromium (tests/apps/test_browser.py); it is installed here where missing
# (root and apt-get needed; elsewhere the test skips and says why).
chromium:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium not installed: the studio's browser test will skip"; }

test: lint chromium
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q

demo: $(MAIN_STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/difftune quickstart --out outputs/quickstart

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
