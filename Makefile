# `make demo` and `make test` work on a fresh machine: they create .venv and install the pinned stack.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO    ?= demo
export OMP_NUM_THREADS ?= 1

.PHONY: install lint format test test-fast demo bench bench-train clean

$(STAMP): requirements.txt requirements-torchrec.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	# torchrec's metadata asks for the CUDA fbgemm-gpu; its real deps are in requirements.txt.
	$(BIN)/pip install -q --no-deps -r requirements-torchrec.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/argus data synth --out $(DEMO)/data --users 2000 --items 5000 --mean-len 120 --shards 7 --holdout loo --seed 0
	$(BIN)/argus data inspect $(DEMO)/data
	$(BIN)/argus data verify $(DEMO)/data
	$(BIN)/argus data stream $(DEMO)/data --world-size 2 --num-workers 2 --batch-size 64
	# 2 CPU ranks (gloo): item table row-wise sharded by TorchRec, encoder under DeepSpeed ZeRO-2
	$(BIN)/torchrun --nproc_per_node=2 --master_port=29547 $(BIN)/argus train configs/mini.yaml \
	    data.path=$(DEMO)/data out=$(DEMO)/run train.steps=300 train.log_every=50 \
	    data.batch_size=16 model.max_seq_len=64 embeddings.sharding=row_wise deepspeed.stage=2
	$(BIN)/argus eval $(DEMO)/run --data $(DEMO)/data

bench: $(STAMP)
	rm -rf $(DEMO)/bench-data
	$(BIN)/argus data synth --out $(DEMO)/bench-data --users 20000 --items 100000 --mean-len 1000 --shards 8 --seed 1
	$(BIN)/python bench/read_throughput.py $(DEMO)/bench-data

bench-train: $(STAMP)
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
