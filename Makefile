# amo-gateway: `make run` serves (sandbox mode when no client secret is configured), `make test` tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install lock run test check lint typecheck evidence soak bench clean clean-dev nginx-available postgresql-available

install: $(STAMP)

# Runtime dependencies come from the hash-locked requirements.lock (as on the VPS); dev tools from pyproject.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Re-pin the runtime dependencies (newest versions pyproject allows), with hashes; commit the result.
lock: install
	$(BIN)/python -m pip install --quiet pip-tools
	$(BIN)/pip-compile --quiet --upgrade --generate-hashes --no-emit-index-url --no-emit-find-links --strip-extras \
		--output-file requirements.lock pyproject.toml

run: install
	$(BIN)/amo-gateway serve --config config.yaml --sandbox

test: install nginx-available postgresql-available
	$(BIN)/python -m pytest -q -m "not evidence"

# The deployment tests run Debian's nginx for real; installed here (apt-get) when missing.
nginx-available:
	@bash scripts/ensure-nginx.sh

# The PostgreSQL backend's tests run a real, throwaway server (tests/pg.py); Debian's package installed when missing.
postgresql-available:
	@bash scripts/ensure-postgresql.sh

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

clean-dev:
	rm -f var/vault.enc var/vault.enc.* var/audit.log

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
