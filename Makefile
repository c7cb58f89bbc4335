# The two commands of the quick start: `make run` and `make test`.
# Each installs what it needs once, with its own stamp file in the venv:
# `make run` the package and redis-server; `make test` the package with its test
# extras and what the tests start (scripts/install-system-packages --test).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test setup setup-run setup-test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

# The test extras include the package itself: `make run` after `make test` installs nothing.
$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(RUN_STAMP)

setup-run: $(RUN_STAMP)
	@scripts/install-system-packages --run

setup-test: $(TEST_STAMP)
	@scripts/install-system-packages --test

setup: setup-test

# Starts Redis (unless REDIS_URL is set), the sandbox mipos (unless MIPOS_CLIENT_ID
# is set), the worker and Flower; with the sandbox, enqueues demo orders. Ctrl-C stops it all.
run: setup-run
	$(PY) scripts/run_local.py $(ARGS)

test: setup-test
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .run
