# vitpod: `make demo` trains the demo, `make test` runs the tests (both set up .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# 8 fake CPU devices: the laptop stand-in for a TPU host.
FAKE_DEVICES := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
# glibc backs large allocations with transparent huge pages: XLA:CPU takes fresh memory for
# every step's buffers, and with 4 KiB pages the faults cost 10-30 % of a ViT-S/16 step
# (DESIGN.md, Performance). Ignored where glibc is older than 2.35 or THP is off.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
# Values given on make's command line reach the programs as typed: make would otherwise expand
# `$(...)` in them (`$(shell ...)` runs even with DRY_RUN=1) when it exports them.
$(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),\
  $(eval override $(v) := $$(value $(v)))$(eval export $(v))))
DIGITS := data/digits
DEMO_WORKDIR ?= runs/demo

.PHONY: install demo test test-fast lint format debug debug-multihost clean \
	bench constraints test-pod-sim test-pod-sim-multislice pod-sim pod-create pod-setup pod-check pod-launch pod-watch \
	pod-status pod-logs pod-ssh pod-delete pod-run image gke-manifest gke-run gke-logs \
	gke-sim test-gke-sim test-image

install: $(VENV)/.installed

# deploy/constraints.txt holds the exact versions tested: the TPU workers get the same ones.
$(VENV)/.installed: pyproject.toml deploy/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c deploy/constraints.txt -e '.[test,demo,tpu]'
	touch $@

# After changing a pin in pyproject.toml: install without the old constraints, then freeze.
constraints:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,demo,tpu]'
	{ sed -n '1,/^# after/p' deploy/constraints.txt; \
	  $(BIN)/pip freeze --exclude-editable | grep -vi '^vitpod'; } > deploy/constraints.tmp
	mv deploy/constraints.tmp deploy/constraints.txt
	touch $(VENV)/.installed

$(DIGITS)/.done: | install
	$(BIN)/python -m vitpod.prepare digits --out=$(DIGITS)
	touch $@

# Trains from scratch each time; the final line is the validation accuracy.
demo: install $(DIGITS)/.done
	rm -rf $(DEMO_WORKDIR)
	$(FAKE_DEVICES) $(BIN)/python -m vitpod.train --config=configs/demo.py --workdir=$(DEMO_WORKDIR)

# Two test modules at a time (module fixtures stay in one process): much of the suite is
# single-threaded compiles and process start-ups, so on 2 cores it takes ~18 min, not ~25.
# The pod rehearsals are their own serial steps: `make test-pod-sim`, then
# `make test-pod-sim-multislice`.
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile

test: install
	$(PYTEST) -m "not podsim and not image"

test-fast: install
	$(PYTEST) -m "not slow and not podsim and not image"

# `make pod-sim` on a v4-16 with a preemption, checked against an uninterrupted 2-process run.
test-pod-sim: install $(DIGITS)/.done
	$(BIN)/python -m pytest -q -m podsim tests/test_pod_sim.py

# `make pod-sim NUM_SLICES=2,1` with one slice preempted and capacity for one slice after it.
test-pod-sim-multislice: install $(DIGITS)/.done
	$(BIN)/python -m pytest -q -m podsim tests/test_pod_sim_multislice.py

# `make gke-sim NUM_SLICES=2` on 2 x v4-16, every node pool preempted once, checked
# against an uninterrupted 2-process run.
test-gke-sim: install $(DIGITS)/.done
	$(BIN)/python -m pytest -q -m podsim tests/test_gke_sim.py

# The GKE image built for real with podman (no daemon) on a local Debian 12 base, the JobSet's
# train command run inside it against the same steps outside; leaves localhost/vitpod:sim,
# which make gke-sim then runs its pods in. As root (apt-get, debootstrap, buildah).
test-image: install $(DIGITS)/.done
	$(BIN)/python -m pytest -q -s -m image tests/test_image.py

lint: install
	$(BIN)/ruff check vitpod tests configs deploy benchmarks testkit

format: install
	$(BIN)/ruff check --fix vitpod tests configs deploy benchmarks testkit
	$(BIN)/ruff format vitpod tests configs deploy benchmarks testkit

# A 20-step run of the tiny model on the digits that stops at the first NaN.
debug: install $(DIGITS)/.done
	rm -rf runs/debug
	$(FAKE_DEVICES) JAX_DEBUG_NANS=1 $(BIN)/python -m vitpod.train --config=configs/tiny.py \
	  --workdir=runs/debug --config.data.train_dir=$(DIGITS)/train \
	  --config.data.val_dir=$(DIGITS)/val --config.total_steps=20 --config.log_every=1

# The demo as a real 2-host job: 2 processes x 4 fake devices, jax.distributed on loopback,
# in a v4-16's device order (libtpu's v4:2x2x2: the two hosts' rows of the batch alternate).
debug-multihost: install $(DIGITS)/.done
	rm -rf runs/demo-2x4
	$(BIN)/python -m vitpod.local_hosts --num_processes=2 --devices_per_process=4 \
	  --topology=v4:2x2x2 -- \
	  --config=configs/demo.py --workdir=runs/demo-2x4

# Benchmarks with their baselines; writes benchmarks/results.json and results.md.
bench: install
	$(BIN)/python benchmarks/run.py

# Rehearse pod-run on localhost first: a simulated v4-16 (2 workers x 4 fake devices),
# preempted at step PREEMPT_AT_STEP, to DONE. Takes TPU_TYPE, NUM_SLICES, CONFIG, TRAIN_FLAGS
# as pod-run (NUM_SLICES=2: two such slices as one job, the last one preempted).
pod-sim: install $(DIGITS)/.done
	$(BIN)/python -m deploy.sim.podsim

# Rehearse gke-run on localhost: a simulated kubectl and JobSet controller run the JobSet's
# pods as local processes (v4-16: 2 pods x 4 fake devices per slice), every node pool
# preempted at step PREEMPT_AT_STEP, to DONE. Takes TPU_TYPE, NUM_SLICES, CONFIG, TRAIN_FLAGS.
# The pods run in the image make test-image built, when it is there and of this checkout.
gke-sim: install $(DIGITS)/.done
	$(BIN)/python -m deploy.sim.gkesim

# Cloud TPU slices: settings in deploy/pod.env, overridable here (make pod-run TPU_TYPE=v4-32).
# DRY_RUN=1 prints the gcloud commands instead of running them. Plain python3, no venv needed.
POD := $(PYTHON) -m deploy.tpu_vm
pod-create:
	$(POD) create
pod-setup:
	$(POD) setup
pod-check:
	$(POD) check
pod-launch:
	$(POD) launch
pod-watch:
	$(POD) watch
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

# GKE (docs/gke.md), from the same settings. Plain python3 too.
GKE := $(PYTHON) -m deploy.gke
# The container image IMAGE from this checkout, set up by deploy/worker.sh (docker, or podman
# without a daemon); prints its tag and size.
image:
	$(GKE) image
# The run's JobSet as YAML on stdout, nothing else: make -s gke-manifest | kubectl apply -f -
gke-manifest:
	@$(GKE) manifest
# Apply the JobSet, watch it to DONE (its restarts are the run's relaunches), delete it.
gke-run:
	$(GKE) run
# The pods' log tails, each line prefixed [wN] (WORKER=all), or one worker's (WORKER=N).
gke-logs:
	$(GKE) logs

clean:
	rm -rf runs data .pytest_cache
