# One command each: `make demo` (set up + run the main job), `make test` (set up + run the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: pin torch first (an unpinned torch pulls a multi-GB CUDA build). GPU users: TORCH_SPEC="torch".
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test demo lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c constraints.txt -c $(VENV)/torch-constraint.txt -e ".[dev,nudity,quality,plots]"
	touch $@

test: setup
	$(PY) -m pytest -q --durations=15 tests

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

demo: setup
	$(VENV)/bin/trace-erase demo --output out/demo --overwrite

bench: setup
	$(PY) benchmarks/closed_form.py

clean:
	rm -rf $(VENV) .pytest_cache
