# Thin aliases for run.py, which does the set-up on every platform (Windows has no make):
#   make demo        = python run.py demo        create .venv if missing, install, run `workbench demo`
#   make test        = python run.py test        same set-up plus the test extras, the whole suite
#   make test-fast   = python run.py test-fast   the suite without the slow end-to-end tests
#   make app / make doctor                       the dashboard / what this machine has
# Arguments: make test PYTEST_ARGS="-x tests/test_cli.py", make demo ARGS=--fresh
PYTHON ?= python3

.PHONY: demo test test-fast app doctor clean-venv

demo:
	$(PYTHON) run.py demo $(ARGS)

app:
	$(PYTHON) run.py app $(ARGS)

doctor:
	$(PYTHON) run.py doctor $(ARGS)

test:
	$(PYTHON) run.py test $(PYTEST_ARGS)

test-fast:
	$(PYTHON) run.py test-fast $(PYTEST_ARGS)

clean-venv:
	rm -rf .venv
