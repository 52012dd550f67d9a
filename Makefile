# steep.repl developer entry points. `make demo` and `make test` do all set-up themselves.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
COLL := .collections/ansible_collections/steep/repl
DEMO_LAB ?= /tmp/steep-lab/demo
export ANSIBLE_COLLECTIONS_PATH := $(CURDIR)/.collections
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup demo demo-down test unit integration sanity lint molecule extension bench clean

$(BIN)/.installed: requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(COLL):
	mkdir -p $(dir $(COLL))
	ln -sfn $(CURDIR) $(COLL)

setup: $(BIN)/.installed $(COLL)

extension: setup
	$(BIN)/python extension/build.py

demo: setup
	$(BIN)/python -m steeplab --dir $(DEMO_LAB) up --nodes 2 --pg 18
	$(BIN)/python scripts/demo.py $(DEMO_LAB)

demo-down: setup
	$(BIN)/python -m steeplab --dir $(DEMO_LAB) down

unit: setup
	$(BIN)/python -m pytest -q tests/unit

integration: setup
	$(BIN)/python -m pytest -q tests/integration

sanity: setup
	bash scripts/sanity.sh

lint: setup
	$(BIN)/ansible-lint -q playbooks roles

molecule: setup
	cd extensions && $(CURDIR)/$(BIN)/molecule test -s default

# The README's test command: everything CI checks.
test: setup
	$(BIN)/python extension/build.py --check
	rm -rf .coverage .coverage-modules
	STEEP_MODULE_COVERAGE=$(CURDIR)/.coverage-modules $(BIN)/python -m pytest -q -ra --cov=plugins --cov=steeplab --cov=agent --cov-report= tests
	$(BIN)/python -m coverage combine --append .coverage-modules
	$(BIN)/python -m coverage report
	bash scripts/sanity.sh
	$(BIN)/ansible-lint -q playbooks roles
	cd extensions && $(CURDIR)/$(BIN)/molecule test -s default

bench: setup
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .collections .lab
