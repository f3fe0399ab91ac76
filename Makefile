# amo-gateway: `make run` serves (sandbox mode when no client secret is configured), `make test` tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test check lint typecheck evidence bench clean nginx-available

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/amo-gateway serve --config config.yaml --sandbox

test: install nginx-available
	$(BIN)/python -m pytest -q -m "not evidence"

# The deployment tests run Debian's nginx for real; installed here (apt-get) when missing.
nginx-available:
	@bash scripts/ensure-nginx.sh

lint: install
	$(BIN)/ruff check amo_gateway tests

typecheck: install
	$(BIN)/mypy amo_gateway

check: lint typecheck test

evidence: install
	$(BIN)/python -m pytest -q -m evidence

bench: install
	$(BIN)/python scripts/bench.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
