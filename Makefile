# executus_ckpt — `make demo` and `make test` work from a fresh clone (they install first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SOURCES := executus_ckpt tests migrations $(wildcard bench) $(wildcard examples)
# every extra: the integrations and OpenTelemetry are tested by `make test`
EXTRAS := postgres,pydantic-ai,openai-agents,otel
# pytest-xdist workers for `make test` (0 runs in one process)
TEST_WORKERS ?= 2

.PHONY: install db lint type test bench demo migrate check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]' --group dev
	@touch $@

db: ## start the machine's PostgreSQL if it is installed but stopped
	@scripts/ensure-postgres.sh >/dev/null || true

lint: install
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)

type: install
	$(BIN)/mypy

# Both backends. PostgreSQL: EXECUTUS_CKPT_TEST_PG_URL if set, else the machine's server on
# 127.0.0.1:5432, else a throwaway server from the installed binaries. CI sets
# EXECUTUS_CKPT_REQUIRE_PG=1 so that PostgreSQL cases that cannot run fail instead of skipping.
test: install db lint type
	PYTHONASYNCIODEBUG=1 \
	EXECUTUS_CKPT_TEST_PG_URL=$${EXECUTUS_CKPT_TEST_PG_URL:-$$(scripts/ensure-postgres.sh)} \
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

check: test

demo: install
	$(BIN)/python -m executus_ckpt demo

migrate: install
	$(BIN)/executus-ckpt migrate

bench: install db
	$(BIN)/pip install -q -e . --group dev --group bench
	EXECUTUS_CKPT_TEST_PG_URL=$${EXECUTUS_CKPT_TEST_PG_URL:-$$(scripts/ensure-postgres.sh)} \
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) dist build .pytest_cache .mypy_cache .ruff_cache .demo
