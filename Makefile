# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make run    install the service into .venv and serve it on 0.0.0.0:5001
#   make test   install the test dependencies too and run the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run serve test bench lint

$(VENV)/.run-deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

$(VENV)/.test-deps: $(VENV)/.run-deps requirements-test.txt
	$(PY) -m pip install -r requirements.txt -r requirements-test.txt
	touch $@

run: $(VENV)/.run-deps
	$(PY) main.py

serve: $(VENV)/.run-deps
	$(VENV)/bin/gunicorn main:app -c gunicorn_config.py

test: $(VENV)/.test-deps
	$(PY) -m pytest

lint: $(VENV)/.test-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy *.py classification tests

bench: $(VENV)/.test-deps
	$(PY) -m pip install -r bench/requirements.txt
	$(PY) bench/run.py
