# provq: `make demo` runs the main job, `make test` the test suite; both install first when needed.
# `make help` lists the targets (these and mk/*.mk's).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
SEEDS ?= 0 1 2 3 4

.PHONY: help install demo test test-lowest lint bench clean

# `make help` lists every target whose line ends in `## what it does` (here and in mk/*.mk).
help: ## list the make targets and what each does
	@awk -F':.*## ' '/^[A-Za-z0-9_.-]+:.*## / {printf "  %-17s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# constraints.txt pins the torch/torchvision pair tested on the project's machine (setup.cfg only
# gives ranges, so a cluster's own torch build is kept when provq is installed next to it).
# The fused CPU search kernel is compiled here (once per machine and torch version, ~30 s), so
# no run pays for it; without a C++ compiler that is one line and provq keeps its torch search.
$(STAMP): setup.py setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	$(BIN)/python -m provq_lightning.vq.cpu_kernel --build || true
	touch $@

install: $(STAMP) ## create .venv and install provq editable with its test extras

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,bench]"
	touch $@

demo: $(STAMP) ## install if needed; TopoDisc vanilla VQ vs ProVQ over SEEDS, print the table
	$(BIN)/python -m provq_lightning.tools.demo --seeds $(SEEDS)

test: $(STAMP) ## install if needed; run the test suite
	$(BIN)/python -m pytest -q tests

# Every install_requires dependency at its floor (constraints-lowest.txt) in a fresh venv, then
# the CLI, resume and checkpoint tests there (scripts/test_lowest.sh; downloads about 3 GB).
LOWEST_VENV ?= .venv-lowest
test-lowest: ## every dependency at its setup.cfg floor in a fresh venv; CLI/resume/checkpoint tests
	scripts/test_lowest.sh $(LOWEST_VENV)

lint: $(STAMP) ## ruff check
	$(BIN)/ruff check .

bench: $(BENCH_STAMP) ## install the benchmark extras; run every benchmarks/bench_*.py
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean: ## remove runs/, lightning_logs/ and .pytest_cache/
	rm -rf runs lightning_logs .pytest_cache

-include mk/*.mk
