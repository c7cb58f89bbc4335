# The two commands of the quick start: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test setup clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed
	@scripts/install-system-packages

# Starts Redis (unless REDIS_URL is set), the sandbox mipos (unless MIPOS_CLIENT_ID
# is set), the worker and Flower; with the sandbox, enqueues demo orders. Ctrl-C stops it all.
run: setup
	$(PY) scripts/run_local.py $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .run
