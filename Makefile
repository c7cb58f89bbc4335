# The two commands of the quick start: `make run` and `make test` (and `make test-all`: the
# suite on every supported Python; `make docs`: the documentation site, served locally).
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
NOX_STAMP := $(VENV)/.installed-nox

# The supported Pythons (noxfile.py): `make test-all` runs the whole suite on each, `make
# test-fast` a fast subset on 3.12 and 3.13 (CI). nox finds python3.11, python3.12 and
# python3.13 on PATH; pyenv's installs go first, because pyenv's shims answer only for the
# versions pyenv has chosen.
PYENV_ROOT ?= $(HOME)/.pyenv
PYTHON_BINS := $(wildcard $(foreach v,3.11 3.12 3.13,$(PYENV_ROOT)/versions/$(v)*/bin))
empty :=
space := $(empty) $(empty)
NOX_PATH := $(subst $(space),:,$(strip $(PYTHON_BINS) $(PATH)))
NOX := PATH="$(NOX_PATH)" $(PY) -m nox
FAST_PYTHONS ?= 3.12 3.13

.PHONY: run test test-all test-fast docs setup setup-run setup-test wheel clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml requirements/worker.txt | $(PY)
	$(PY) -m pip install --quiet -e . -r requirements/worker.txt
	$(PY) -c "import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()['purelib'], 'mipos-worker-checkout.pth').write_text('$(CURDIR)\n')"
	touch $@

# The test requirements include the worker's: `make run` after `make test` installs nothing.
$(TEST_STAMP): pyproject.toml requirements/worker.txt requirements/docs.txt requirements/test.txt | $(PY)
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

$(NOX_STAMP): requirements/nox.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements/nox.txt
	touch $@

# The whole suite on 3.11, 3.12 and 3.13, each in its own venv under .nox/ (PYTEST_ARGS passed on).
test-all: setup-test $(NOX_STAMP)
	$(NOX) --session tests -- $(PYTEST_ARGS)

# noxfile.py's FAST_TESTS on FAST_PYTHONS: the project installs there and its core passes.
test-fast: setup-test $(NOX_STAMP)
	$(NOX) --session $(foreach v,$(FAST_PYTHONS),fast-$(v)) -- $(PYTEST_ARGS)

# The documentation site (docs/, mkdocs.yml), served at http://127.0.0.1:8000 while you edit it.
docs: $(TEST_STAMP)
	$(PY) -m mkdocs serve

# The POS side's wheel, as a POS installs it: dist/mipos_worker-*.whl
wheel: | $(PY)
	$(PY) -m pip install --quiet build
	$(PY) -m build --wheel --outdir dist .

clean:
	rm -rf $(VENV) .nox .run dist build
