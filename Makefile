# vitpod: `make demo` trains the demo, `make test` runs the tests (both set up .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# 8 fake CPU devices: the laptop stand-in for a TPU host.
FAKE_DEVICES := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
# glibc backs large allocations with transparent huge pages: XLA:CPU takes fresh memory for
# every step's buffers, and with 4 KiB pages the faults cost 10-25 % of a ViT-S/16 step
# (DESIGN.md, issue 10). Ignored where glibc is older than 2.35 or THP is off.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
DIGITS := data/digits
DEMO_WORKDIR ?= runs/demo

.PHONY: install demo test test-fast lint format debug debug-multihost clean \
	bench pod-create pod-setup pod-launch pod-status pod-logs pod-ssh pod-delete pod-run

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,demo,tpu]'
	touch $@

$(DIGITS)/.done: | install
	$(BIN)/python -m vitpod.prepare digits --out=$(DIGITS)
	touch $@

# Trains from scratch each time; the final line is the validation accuracy.
demo: install $(DIGITS)/.done
	rm -rf $(DEMO_WORKDIR)
	$(FAKE_DEVICES) $(BIN)/python -m vitpod.train --config=configs/demo.py --workdir=$(DEMO_WORKDIR)

# Two test modules at a time (module fixtures stay in one process): much of the suite is
# single-threaded compiles and process start-ups, so on 2 cores it takes ~14.5 min, not ~21.
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

lint: install
	$(BIN)/ruff check vitpod tests configs deploy benchmarks

format: install
	$(BIN)/ruff check --fix vitpod tests configs
	$(BIN)/ruff format vitpod tests configs

# A 20-step run of the tiny model on the digits that stops at the first NaN.
debug: install $(DIGITS)/.done
	rm -rf runs/debug
	$(FAKE_DEVICES) JAX_DEBUG_NANS=1 $(BIN)/python -m vitpod.train --config=configs/tiny.py \
	  --workdir=runs/debug --config.data.train_dir=$(DIGITS)/train \
	  --config.data.val_dir=$(DIGITS)/val --config.total_steps=20 --config.log_every=1

# The demo as a real 2-host job: 2 processes x 4 fake devices, jax.distributed on loopback.
debug-multihost: install $(DIGITS)/.done
	rm -rf runs/demo-2x4
	$(BIN)/python -m vitpod.launch --num_processes=2 --devices_per_process=4 -- \
	  --config=configs/demo.py --workdir=runs/demo-2x4

# Benchmarks with their baselines; writes benchmarks/results.json and results.md.
bench: install
	$(BIN)/python benchmarks/run.py

# Cloud TPU slices: settings in deploy/pod.env, overridable here (make pod-run TPU_TYPE=v4-32).
# DRY_RUN=1 prints the gcloud commands instead of running them.
POD := $(PYTHON) deploy/pod.py
pod-create:
	$(POD) create
pod-setup:
	$(POD) setup
pod-launch:
	$(POD) launch
pod-status:
	$(POD) status
pod-logs:
	$(POD) logs
pod-ssh:
	$(POD) ssh
pod-delete:
	$(POD) delete
pod-run:
	$(POD) run

clean:
	rm -rf runs data .pytest_cache
