# The two commands of a fresh machine:  `make demo`  and  `make test`.
# Each creates the local virtualenv .venv (once, and again when pyproject.toml changes).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-slow

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/moee demo --config configs/demo.py:cpu --out outputs/demo

# pytest exits 5 when no test was collected; that is not a failure of the code under test.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow
