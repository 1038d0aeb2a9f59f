# Two commands do everything on a fresh machine:
#   make demo   create .venv if missing, install, run `workbench demo` on the built-in tiny models
#   make test   same set-up plus the test extras, then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast install install-test clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PY) -m pip install $(TORCH)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/workbench demo

test: install-test
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install-test  # the tests not marked slow: about a minute
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
