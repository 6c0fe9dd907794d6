# `make demo` and `make test` set everything up first (scripts/setup.sh: idempotent, seconds when done).
PY := .venv/bin/python
RUFF := .venv/bin/ruff

.PHONY: setup demo serve cluster test test-heavy test-slow bench soak lint format

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
