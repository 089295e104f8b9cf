# voicebook: `make run` starts the whole product on embedded defaults; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Reinstall when pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install run migrate test test-services lint bench load clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

migrate: install
	$(BIN)/voicebook migrate

run: migrate
	$(BIN)/voicebook serve

# Workers per run (pytest-xdist); a test file's tests stay on one worker (its module fixtures are built once).
TEST_WORKERS ?= 2

test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# The same suite against the local Redis and PostgreSQL services.
test-services: install
	VOICEBOOK_TEST_BACKEND=services $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install
	$(BIN)/python load_tests/bench_booking.py

# A local load test: simulators, server and locust, then the summary (load_tests/run_load.py --help).
# e.g. make load LOAD_ARGS="--scenario burst --users 100 --seconds 120"
LOAD_ARGS ?= --scenario steady --users 10 --spawn-rate 5 --seconds 60
load: install
	$(BIN)/python -c 'import locust.main, matplotlib' 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[load]'
	$(BIN)/python load_tests/run_load.py $(LOAD_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
