# amo-gateway: `make run` serves (sandbox mode when no client secret is configured), `make test` tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test check lint typecheck evidence soak bench mutation planted clean clean-dev nginx-available

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
	$(BIN)/ruff check amo_gateway tests scripts

typecheck: install
	$(BIN)/mypy amo_gateway

check: lint typecheck test

# Minutes, not hours: the long property/fuzz runs, then the scripts, each printing its figures (JSON kept in var/).
EVIDENCE_DIR := var/evidence

evidence: install
	$(BIN)/python -m pytest -q -m evidence
	mkdir -p $(EVIDENCE_DIR)
	$(BIN)/python scripts/crashloop.py --kills 200 --report $(EVIDENCE_DIR)/crashloop.json
	$(BIN)/python scripts/multiproc.py --processes 4 --seconds 180 --report $(EVIDENCE_DIR)/multiproc.json
	$(MAKE) soak

# Load on /token, /test and the proxy with tokens rotating every 2 s (wrk, else an aiohttp loop); RSS sampled.
soak: install
	mkdir -p $(EVIDENCE_DIR)
	$(BIN)/python scripts/soak.py --seconds 120 --report $(EVIDENCE_DIR)/soak.json

bench: install
	$(BIN)/python scripts/bench.py

# The mutation gate (README, "Mutation testing"): first the ten planted bugs of issue 14, each of which the
# test suite must catch; then mutmut over the guarantee modules, at most 2 mutants at a time, kill rate per module.
MUTATION_DIR := var/mutation

planted: install nginx-available
	mkdir -p $(MUTATION_DIR)
	nice -n 10 $(BIN)/python scripts/planted.py --report $(MUTATION_DIR)/planted.json

mutation: planted
	nice -n 10 $(BIN)/python scripts/mutation.py --max-children 2 --report $(MUTATION_DIR)/mutmut.json

clean-dev:
	rm -f var/vault.enc var/vault.enc.* var/audit.log

clean:
	rm -rf $(VENV) var mutants .pytest_cache .mypy_cache .ruff_cache
