# Two commands on a fresh machine: `make quickstart` trains the example, `make test` tests.
# Both install into .venv first (once; again when the dependencies change).
# The quickstart installs what it uses (torch and the examples' libraries); the tests install
# everything (every framework, Horovod's build, the test and benchmark tools).
VENV := .venv
INSTALLED := $(VENV)/.installed
QUICKSTART_INSTALLED := $(VENV)/.installed-quickstart
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# Prefect's ephemeral API migrates a fresh database first: on a small machine that takes longer
# than its 20 s default to answer (measured 25-40 s on 2 cores).
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: install quickstart test lint docs bench

install: $(INSTALLED)

$(INSTALLED): pyproject.toml constraints.txt scripts/install.sh
	bash scripts/install.sh
	touch $@ $(QUICKSTART_INSTALLED)

$(QUICKSTART_INSTALLED): pyproject.toml constraints.txt scripts/install.sh
	bash scripts/install.sh quickstart
	touch $@

quickstart: $(QUICKSTART_INSTALLED)
	$(VENV)/bin/python flows/quickstart.py

test: $(INSTALLED)
	$(VENV)/bin/python -m pytest

lint: $(INSTALLED)
	$(VENV)/bin/python -m ruff check prefect_distrain tests flows benchmarks

docs: $(INSTALLED)
	$(VENV)/bin/python -m mkdocs build --strict --site-dir site

bench: $(INSTALLED)
	$(VENV)/bin/python benchmarks/run.py
