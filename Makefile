# Two commands matter: `make sweep EXP=<name>` and `make test`. Both build .venv on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# On this project's CPU machines these wheels lie on disk; on a cluster override, e.g. TORCH_SPEC="torch==2.5.1".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

EXP ?= conditioning_candidates
CLUSTER ?= local
PROFILE ?=
SMOKE ?=
PAPER ?=
SET ?=
SEEDS ?=
# SEEDS=0,1,2: every run once per training seed (--set seeds=[0,1,2]); empty = base.yaml's (one run, seed 0)
SEED_SET = $(if $(SEEDS),--set seeds=[$(SEEDS)])
RUN ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: help venv test test-fast lint sweep config status collect figures bench plan

# make help: every target with one line
help:
	@awk '/^# make / { if (line == "") line = substr($$0, 3); next } /^#/ { next } /^[a-z-]+:/ { t = $$1; sub(/:.*/, "", t); print "  " (line == "" ? "make " t ": (undocumented)" : line) } { line = "" }' $(firstword $(MAKEFILE_LIST))

# make venv: build .venv (torch, then this package with its dev extras); the other targets do it on first use
venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# make test [PYTEST_ARGS=...]: every test, the slow end-to-end ones included (this is what CI runs)
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# make test-fast: the unit tests only, without the slow ones (a few minutes)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# make lint: ruff over the whole repo
lint: $(STAMP)
	$(VENV)/bin/ruff check .

# make sweep EXP=<name>: run an experiment's grid (tiny CPU variant; SMOKE=1 SEEDS=0,1,2 CLUSTER=slurm PAPER=1)
# make sweep EXP=conditioning_candidates [SMOKE=1] [SEEDS=0,1,2] [CLUSTER=local|debug|slurm]
#            [PROFILE=<slurm/profiles/NAME>]
#            [PAPER=1 SET="data.hf.path=parquet data.hf.data_files=/data/*.parquet"]  (the YAML's paper variant)
sweep: $(STAMP)
	$(PY) -m experiments.launch $(EXP) --cluster $(CLUSTER) $(if $(PROFILE),--profile $(PROFILE)) $(if $(SMOKE),--smoke) $(if $(PAPER),--paper) $(foreach kv,$(SET),--set $(kv)) $(SEED_SET)

# make config EXP=<name> [RUN=<run>] [PAPER=1] [SMOKE=1] [SET=...]: each run's resolved config and run folder
config: $(STAMP)
	$(PY) -m experiments.config $(EXP) $(if $(RUN),--run $(RUN)) $(if $(SMOKE),--smoke) $(if $(PAPER),--paper) $(foreach kv,$(SET),--set $(kv)) $(SEED_SET)

# make plan EXP=<name> PAPER=1 [PROFILE=...]: compute plan (params, FLOPs, memory, GPU-hours) -> results/plan/
# Every run of the paper variant is built and stepped on meta tensors: parameters, FLOPs, memory per GPU, fits,
# step time, GPU-hours -> results/plan/<EXP>.{csv,md}
plan: $(STAMP)
	$(PY) -m experiments.plan $(EXP) $(if $(PAPER),--paper) $(if $(PROFILE),--profile $(PROFILE)) $(foreach kv,$(SET),--set $(kv))

# make status EXP=<name> [SMOKE=1]: one row per run (pending/running/requeued/done/failed, step, metric, log)
status: $(STAMP)
	$(PY) -m experiments.status $(EXP) $(if $(SMOKE),--smoke) $(if $(PAPER),--paper) $(foreach kv,$(SET),--set $(kv)) $(SEED_SET)

# make collect EXP=<name> [SMOKE=1]: rebuild results/<EXP>/metrics.csv + figure from the run directories
collect: $(STAMP)
	$(PY) -m experiments.launch $(EXP) --collect $(if $(SMOKE),--smoke) $(if $(PAPER),--paper) $(foreach kv,$(SET),--set $(kv)) $(SEED_SET)

# make figures: every figure, table (table.md, paired.csv) and checkpoint analysis of every results/<EXP>/, from files
figures: $(STAMP)
	$(PY) -m analysis.figures --all

# make bench [BENCH_ARGS="--device cuda"]: speed/memory figures side by side -> results/bench/bench.csv (not a test)
bench: $(STAMP)
	$(PY) benchmarks/bench.py $(BENCH_ARGS)
