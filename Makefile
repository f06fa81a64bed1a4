# thunderline-lab: `make run` (the main job) and `make test` (the tests).
# Both create or update .venv first; set-up is a no-op when pyproject.toml has not changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
STUDY  ?= studies/spectral_norm_ab.toml
# pytest-xdist workers for the unit tests (CI has 2 cores; tests/conftest.py schedules them)
TEST_WORKERS ?= 2

.PHONY: setup run test lint bench clean
.DEFAULT_GOAL := run

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (thunderline-lab)" >/dev/null
	touch $(STAMP)

run: setup
	$(BIN)/thunderline-lab run $(STUDY)

# nbval executes every notebook with the test profile (small budgets, same code paths), each in
# a throw-away lab of its own: in one shared lab the study notebook found the study another
# notebook had made and trained nothing. Outputs are compared only where a cell asks for it,
# after sanitizing ids, timestamps and durations.
test: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=15
	rc=0; for nb in notebooks/*.ipynb; do \
	  lab=$$(mktemp -d); THUNDERLINE_LAB_PROFILE=test THUNDERLINE_LAB_HOME=$$lab \
	  $(BIN)/python -m pytest -p no:cacheprovider --nbval-lax --nbval-current-env \
	  --nbval-sanitize-with notebooks/nbval_sanitize.cfg $$nb || rc=1; rm -rf $$lab; \
	done; exit $$rc

lint: setup
	$(BIN)/ruff check thunderline_lab tests benchmarks
	$(BIN)/ruff format --check thunderline_lab tests benchmarks
	$(BIN)/mypy

bench: setup
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) lab .pytest_cache
