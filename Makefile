# README command 1: `make demo`   README command 2: `make test`
VENV    := .venv
PY      := $(VENV)/bin/python
DATA    := /usr/share/datasets/fashion-mnist
# DeepSpeed JIT-builds a small comm op with ninja, which pip puts in the venv's bin/
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE ?= 1

.PHONY: setup data browser demo test tables clean-runs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

data:
	@if [ -d $(DATA) ]; then echo "Fashion-MNIST: $(DATA)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)); \
	else echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or point data.root at a folder with its IDX files." >&2; exit 1; fi

# headless Chromium for the MLflow UI test (tests/test_mlflow_server.py); the test is skipped without it
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then echo "Chromium: $$(command -v chromium)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q chromium chromium-driver || (apt-get update -q && apt-get install -y -q chromium chromium-driver) \
	   || echo "Chromium could not be installed: the MLflow UI test will be skipped." >&2); \
	else echo "Chromium is missing: the MLflow UI test will be skipped (sudo apt-get install chromium chromium-driver)." >&2; fi

demo: setup data
	$(PY) experiments/sweep_sigma.py
	$(PY) analysis/make_tables.py

tables: setup
	$(PY) analysis/make_tables.py

test: setup data browser
	$(PY) -m pytest -q

clean-runs:
	rm -rf runs
