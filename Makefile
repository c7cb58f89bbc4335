# The two commands of the quick start: `make run` and `make test`.
# Each installs what it needs once, with its own stamp file in the venv:
# `make run` the POS-side package, the worker's requirements and redis-server;
# `make test` those with the test requirements and what the tests start
# (scripts/install-system-packages --test).
#
# The worker runs from this checkout: the venv gets the POS-side package
# (mipos_worker, editable) and a .pth that puts this checkout's top-level
# packages (worker, tasks, config, cli, ...) on its path. A POS installs only
# the wheel (see README, "Layout").
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test setup setup-run setup-test wheel clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml requirements/worker.txt | $(PY)
	$(PY) -m pip install --quiet -e . -r requirements/worker.txt
	$(PY) -c "import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()['purelib'], 'mipos-worker-checkout.pth').write_text('$(CURDIR)\n')"
	touch $@

# The test requirements include the worker's: `make run` after `make test` installs nothing.
$(TEST_STAMP): pyproject.toml requirements/worker.txt requirements/test.txt | $(PY)
	$(PY) -m pip install --quiet -e . -r requirements/test.txt
	$(PY) -c "import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()['purelib'], 'mipos-worker-checkout.pth').write_text('$(CURDIR)\n')"
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

# The POS side's wheel, as a POS installs it: dist/mipos_worker-*.whl
wheel: | $(PY)
	$(PY) -m pip install --quiet build
	$(PY) -m build --wheel --outdir dist .

clean:
	rm -rf $(VENV) .run dist build
