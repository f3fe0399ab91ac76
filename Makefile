# amo-gateway: `make run` serves (sandbox mode when no client secret is configured), `make test` tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install lock run test check lint typecheck evidence soak bench mutation planted clean clean-dev nginx-available \
	systemd-available chromium-available postgresql-available

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

test: install nginx-available systemd-available chromium-available postgresql-available
	$(BIN)/python -m pytest -q -m "not evidence"

# The deployment tests run Debian's nginx for real; installed here (apt-get) when missing.
nginx-available:
	@bash scripts/ensure-nginx.sh

# The systemd tests run systemd-analyze and boot a real systemd as PID 1 in namespaces (tests/test_systemd_real.py):
# systemd, python3-venv, unshare/nsenter and ip, installed here (apt-get) when missing. Under CI=true a test that
# still cannot run fails instead of skipping.
systemd-available:
	@bash scripts/ensure-systemd.sh

# The console's browser test drives Debian's chromium (never a downloaded browser); installed here when missing.
chromium-available:
	@bash scripts/ensure-chromium.sh

# The PostgreSQL backend's tests run a real, throwaway server (tests/pg.py); Debian's package installed when missing.
postgresql-available:
	@bash scripts/ensure-postgresql.sh

lint: install
	$(BIN)/ruff check amo_gateway tests scripts

typecheck: install
	$(BIN)/mypy amo_gateway

check: lint typecheck test

# Minutes, not hours: the long property/fuzz runs, then the scripts, each printing its figures (JSON kept in var/).
# replicas.py: three replicas on one throwaway PostgreSQL, kill -9 and restart, the database down 5 s, a proxy burst.
EVIDENCE_DIR := var/evidence

evidence: install postgresql-available
	$(BIN)/python -m pytest -q -m evidence
	mkdir -p $(EVIDENCE_DIR)
	$(BIN)/python scripts/bench_pg.py --full --report $(EVIDENCE_DIR)/bench_pg.json
	$(BIN)/python scripts/crashloop.py --kills 200 --report $(EVIDENCE_DIR)/crashloop.json
	$(BIN)/python scripts/multiproc.py --processes 4 --seconds 180 --report $(EVIDENCE_DIR)/multiproc.json
	$(BIN)/python scripts/replicas.py --scenario both --seconds 180 --db-down 5 --report $(EVIDENCE_DIR)/replicas.json
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
