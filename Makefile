# medfoundry: `make quickstart` runs the pipeline end to end on a tiny CPU configuration;
# `make test` checks formatting and lint, then runs the test suite, `make test-long` the slow reliability tests (not run by CI). All set everything up first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
SHARED := ../shared/data
STAMP := $(VENV)/.setup-stamp
DEB_PACKAGES := libtcmalloc-minimal4 g++ ninja-build chromium chromium-driver

.PHONY: setup lint test test-long test-gpu quickstart bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) VENV=$(VENV) DEB_PACKAGES="$(DEB_PACKAGES)" bash scripts/setup.sh
	touch $(STAMP)

# ruff's formatter and linter, configured in pyproject.toml; part of make test, so CI runs it
lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# two workers (pytest-xdist), each test file on one worker so its module fixtures are built once
test: setup lint
	$(BIN)/pytest -q -n 2 --dist loadfile

# many random-point SIGKILLs, full disks and corrupted files over corpus build, tokenization and training
test-long: setup
	$(BIN)/pytest -q -m long

# the CUDA tests (a training step, 2-GPU FSDP2 over NCCL with resume, sampling in the serve engine, evaluation);
# without a GPU they skip themselves, and make test collects them too
test-gpu: setup
	$(BIN)/pytest -q -m gpu tests/gpu

quickstart: setup
	@if [ -d $(SHARED) ]; then \
		$(BIN)/medfoundry run recipes/quickstart.yaml; \
	else \
		echo "$(SHARED) not found: downloading one PubMed baseline file from NCBI"; \
		$(BIN)/medfoundry corpus download pubmed --dest runs/quickstart-ncbi/raw --limit 1 && \
		$(BIN)/medfoundry run recipes/quickstart_ncbi.yaml; \
	fi

bench: setup
	$(BIN)/python benchmarks/corpus_bench.py
	$(BIN)/python benchmarks/tokenizer_bench.py
	$(BIN)/python benchmarks/train_bench.py --quick
	$(BIN)/python benchmarks/eval_bench.py --quick
	$(BIN)/python benchmarks/serve_bench.py --quick

clean:
	rm -rf runs .pytest_cache
