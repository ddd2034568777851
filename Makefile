# The two set-up commands of the README:
#   make demo   runs the daemon on the bundled sample dumps (SQLite, local mail sink)
#   make test   runs the tests (installs what they need first)

PYTHON ?= python3
# Test processes (pytest-xdist): most tests wait on a daemon, a server or a subprocess, so more
# processes than this machine's 2 cores still shorten the run. TEST_WORKERS=0 runs in one.
TEST_WORKERS ?= 3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the packaging changes; the install is editable.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/digest --config config/demo.toml run

test: $(VENV)/.installed
	bash tests/setup-services.sh
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

lint: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[lint]'
	$(BIN)/python -m ruff check digest tests
	$(BIN)/python -m mypy digest
	$(BIN)/lint-imports

bench: $(VENV)/.installed
	$(BIN)/digest bench ingest

clean:
	rm -rf $(VENV) var build *.egg-info
