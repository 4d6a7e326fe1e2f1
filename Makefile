# The two commands of the README, each doing all of its own set-up on a fresh machine:
#
#   make demo   data -> token shards -> train a small GPT-2 -> val loss, HellaSwag, a sample, a plot
#   make test   the whole test suite
#
# Both create a virtual environment in .venv. torch is installed first, pinned by TORCH, so that pip
# never swaps in another build later; to use a particular CUDA build, say so, for example
#   make demo TORCH="torch --index-url https://download.pytorch.org/whl/cu126"
# Offline, point the demo at local files: FINEWEB_DATA_FILES (parquet/jsonl/txt), HELLASWAG_DIR,
# and TIKTOKEN_CACHE_DIR (see the README).

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
DEMO_DIR ?= log/demo
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

# Local files when FINEWEB_DATA_FILES is set, otherwise FineWeb-Edu streamed from the hub.
FINEWEB_SOURCE = $(if $(FINEWEB_DATA_FILES),--data_files $(FINEWEB_DATA_FILES),--streaming)

.PHONY: demo demo-tokenizer demo-chat pipeline test setup

setup: $(VENV)/.runtime-installed

$(VENV)/.runtime-installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH)"
	$(PIP) -r requirements.txt
	touch $@

$(VENV)/.test-installed: $(VENV)/.runtime-installed requirements-test.txt
	$(PIP) -r requirements-test.txt
	touch $@

demo: $(VENV)/.runtime-installed
	$(PY) fineweb.py $(FINEWEB_SOURCE) --data_dir $(DEMO_DIR)/data --shard_size 1e6 --max_tokens 3e6
	$(PY) train_gpt2.py --preset cpu --data_dir $(DEMO_DIR)/data --log_dir $(DEMO_DIR)
	$(PY) plot.py $(DEMO_DIR)

# The demo with a tokenizer of its own: a 16K BPE learned from the same source, its val bits per byte
# comparable with the GPT-2 demo's (plot.py draws both runs' curves).
demo-tokenizer: $(VENV)/.runtime-installed
	$(PY) tokenizer.py train $(FINEWEB_SOURCE) --max_chars 2e7 --vocab_size 16384 --out_dir $(DEMO_DIR)_tok/tokenizer
	$(PY) fineweb.py $(FINEWEB_SOURCE) --tokenizer $(DEMO_DIR)_tok/tokenizer --data_dir $(DEMO_DIR)_tok/data --shard_size 1e6 --max_tokens 3e6
	$(PY) train_gpt2.py --preset cpu --data_dir $(DEMO_DIR)_tok/data --log_dir $(DEMO_DIR)_tok
	$(PY) plot.py $(DEMO_DIR)_tok

# The demo model taught to chat (after make demo): data/capitals.jsonl, about a minute on a CPU.
demo-chat: $(VENV)/.runtime-installed
	$(PY) finetune.py --preset cpu --init $(DEMO_DIR)/model_01500.pt --data_files data/capitals.jsonl --log_dir $(DEMO_DIR)_sft
	$(PY) chat.py --checkpoint $(DEMO_DIR)_sft/model_00300.pt --prompt "Capital of Japan?"

# The whole pipeline (pipeline.py): tokenizer -> shards -> pretraining -> SFT -> DPO and RL -> chat
# evaluations -> log/pipeline/report.md. PIPELINE_FLAGS passes more flags, e.g. --preset gpu.
pipeline: $(VENV)/.runtime-installed
	$(PY) pipeline.py $(PIPELINE_FLAGS)

test: $(VENV)/.test-installed
	$(PY) -m pytest tests -q --durations=10

# The GPU check (docs/benchmarks.md, "GPU check"): every CUDA path and the headline figures in one
# run of ~7 minutes, one JSON line per result, appended to GPU_CHECK_OUT. No virtual environment:
# it runs with the Python that has a CUDA build of torch, on a machine that may have no internet.
#   make gpu-check PYTHON=python3 GPU_CHECK_OUT=results/ HELLASWAG_DIR=data/hellaswag
GPU_CHECK_OUT ?= gpu_check.jsonl

.PHONY: gpu-check
gpu-check:
	$(PYTHON) gpu_check.py --out $(GPU_CHECK_OUT)
