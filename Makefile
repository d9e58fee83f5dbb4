# `make demo` and `make test` work on a fresh machine: they create .venv and install the pinned stack.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO    ?= demo
export OMP_NUM_THREADS ?= 1

.PHONY: install test test-fast demo bench clean

$(STAMP): requirements.txt requirements-torchrec.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	# torchrec's metadata asks for the CUDA fbgemm-gpu; its real deps are in requirements.txt.
	$(BIN)/pip install -q --no-deps -r requirements-torchrec.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/argus data synth --out $(DEMO)/data --users 2000 --items 5000 --mean-len 120 --shards 7 --holdout loo --seed 0
	$(BIN)/argus data inspect $(DEMO)/data
	$(BIN)/argus data verify $(DEMO)/data
	$(BIN)/argus data stream $(DEMO)/data --world-size 2 --num-workers 2 --batch-size 64

bench: $(STAMP)
	rm -rf $(DEMO)/bench-data
	$(BIN)/argus data synth --out $(DEMO)/bench-data --users 20000 --items 100000 --mean-len 1000 --shards 8 --seed 1
	$(BIN)/python bench/read_throughput.py $(DEMO)/bench-data

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
