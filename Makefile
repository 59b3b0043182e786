# One-command entry points. Every target sets up .venv itself (idempotent).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# Two CPU cores are the reference machine: keep BLAS/OpenMP from oversubscribing them.
export OMP_NUM_THREADS ?= 2

.PHONY: setup data test test-fast demo bench gpu-extras clean help

help:
	@echo "make setup   create .venv with pinned packages"
	@echo "make test    run the test suite (CPU)"
	@echo "make demo    train the tiny LiteVAE on Fashion-MNIST 64x64 (CPU, <10 min)"
	@echo "make bench   encoder throughput benchmark (quick)"

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# Debian ships Fashion-MNIST as a package; install it when we can (root on Debian) and it is missing.
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)); \
	  else \
	    echo "Fashion-MNIST not found at $(FMNIST): run 'sudo apt-get install dataset-fashion-mnist' or set data roots (README)"; \
	  fi; \
	fi

test: setup data
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

test-fast: setup
	$(PY) -m pytest -q -n 2 -m "not slow" tests

demo: setup data
	$(PY) scripts/demo.py

bench: setup
	$(PY) scripts/benchmark.py --suite encoder --quick

gpu-extras: setup
	$(PY) -m pip install -r requirements-gpu.txt

clean:
	rm -rf logs/demo* .pytest_cache
