# Two commands on a fresh machine: `make quickstart` trains the example, `make test` tests.
# Both install into .venv first (once; again when the dependencies change).
VENV := .venv
INSTALLED := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install quickstart test lint bench

install: $(INSTALLED)

$(INSTALLED): pyproject.toml constraints.txt scripts/install.sh
	bash scripts/install.sh
	touch $@

quickstart: $(INSTALLED)
	$(VENV)/bin/python flows/quickstart.py

test: $(INSTALLED)
	$(VENV)/bin/python -m pytest

lint: $(INSTALLED)
	$(VENV)/bin/python -m ruff check prefect_distrain tests flows benchmarks

bench: $(INSTALLED)
	$(VENV)/bin/python benchmarks/run.py
