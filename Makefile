# One-command entry points. Every target sets up .venv itself (idempotent).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PHOTOS := /usr/share/games/endless-sky/images/land
# Two CPU cores are the reference machine: keep BLAS/OpenMP from oversubscribing them.
export OMP_NUM_THREADS ?= 2

.PHONY: setup data data-fmnist data-photos test test-fast demo compare compare-full scale-study probe-study compare-dit bench gpu-extras clean help

help:
	@echo "make setup   create .venv with pinned packages"
	@echo "make test    run the test suite (CPU)"
	@echo "make demo    the whole pipeline on Fashion-MNIST 64x64 (CPU, <25 min)"
	@echo "make compare LiteVAE vs SD-VAE: cost, reconstruction (Fashion-MNIST, photos), downstream LDM (CPU, <60 min)"
	@echo "make compare-full the settled version: + LiteVAE-S widths, 1200/1500 steps, 3 repeats (CPU, hours: docs/results/compare_full.md)"
	@echo "make scale-study  stage-1 photo study at compare-full's budget, 3 repeats (reuses its photo runs)"
	@echo "make probe-study  do latent probes predict downstream FID? 10 first stages, 2 repeats (docs/results/probe_study.md)"
	@echo "make compare-dit  the same comparison with a DiT + flow-matching downstream model (reuses make compare's stage 1)"
	@echo "make bench   all benchmark suites, quick CPU version"

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# The project itself, editable: scripts and tests import ldm/autoencoder without touching sys.path.
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# Debian ships Fashion-MNIST and the endless-sky photos (ldm.data.PhotoCrops) as packages; install them when we
# can (root on Debian) and they are missing. The demo needs only Fashion-MNIST; tests and the comparison both.
# $(call debian_data,path that shows it is there,package,what to tell a user who is not root)
define debian_data
	@if [ ! -e $(1) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -qq $(2) || (apt-get update -qq && apt-get install -y -qq $(2))); \
	  else \
	    echo "$(1) not found: run 'sudo apt-get install $(2)' ($(3))"; \
	  fi; \
	fi
endef

data: data-fmnist data-photos

data-fmnist:
	$(call debian_data,$(FMNIST),dataset-fashion-mnist,or set the data roots: docs/stage1.md)

data-photos:
	$(call debian_data,$(PHOTOS),endless-sky-data,configs/data/photos64.yaml)

test: setup data
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

test-fast: setup
	$(PY) -m pytest -q -n 2 -m "not slow" tests

demo: setup data-fmnist
	$(PY) scripts/demo.py

compare: setup data
	$(PY) scripts/compare_encoders.py

# The budget where the ranking settles (docs/results/compare_full.md); the scale study trains the plan's
# variants that the comparison lacks and reuses its arms' photo runs (same keys, steps and seeds).
FULL_OUT := outputs/compare_full
compare-full: setup data
	$(PY) scripts/compare_encoders.py --arms litevae lite_s sd_vae --ae-steps 1200 --ldm-steps 1500 --repeats 3 \
	  --out $(FULL_OUT)

scale-study: setup data
	$(PY) scripts/ablate_stage1.py --steps 1200 --repeats 3 --only litevae lite_s sd_vae sd_5x_noquant \
	  --out $(FULL_OUT)

probe-study: setup data
	$(PY) scripts/probe_study.py

compare-dit: setup data
	$(PY) scripts/compare_encoders.py --ldm-config configs/ldm/fmnist_dit_flow_tiny.yaml

bench: setup
	$(PY) scripts/benchmark.py --suite all --quick

gpu-extras: setup
	$(PY) -m pip install -r requirements-gpu.txt

clean:
	rm -rf logs/demo logs/*_demo_* latents/*demo_litevae* samples/*demo_ldm* outputs/compare_fmnist $(FULL_OUT) .pytest_cache
