# provq: `make demo` runs the main job, `make test` the test suite; both install first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
SEEDS ?= 0 1 2 3 4

.PHONY: install demo test test-lowest lint bench clean

# constraints.txt pins the torch/torchvision pair tested on the project's machine (setup.cfg only
# gives ranges, so a cluster's own torch build is kept when provq is installed next to it).
$(STAMP): setup.py setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

install: $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,bench]"
	touch $@

demo: $(STAMP)
	$(BIN)/python -m provq_lightning.tools.demo --seeds $(SEEDS)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Every install_requires dependency at its floor (constraints-lowest.txt) in a fresh venv, then
# the CLI, resume and checkpoint tests there (scripts/test_lowest.sh; downloads about 3 GB).
LOWEST_VENV ?= .venv-lowest
test-lowest:
	scripts/test_lowest.sh $(LOWEST_VENV)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(BENCH_STAMP)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf runs lightning_logs .pytest_cache

-include mk/*.mk
