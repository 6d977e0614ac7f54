# Each target installs what it needs into .venv first (once, and again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
BENCH_STAMP := $(STAMP)-bench

.PHONY: train test bench clean gpu-check gpu-wheels

## make train [ARGS='--epochs 100 ...']: train on the bundled MNIST sample (the GPU if one answers, else the CPU)
train: $(STAMP)
	$(BIN)/gpunn train $(ARGS)

## make test [ARGS='-k backend']: the test suite (GPU tests are skipped, with the reason, where there is no GPU)
test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

$(STAMP): pyproject.toml
	rm -f $(VENV)/.installed-*
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

## make bench [ARGS='--data-dir ../shared/data/mnist']: epoch throughput of gpunn and its peers on every device present
bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/epoch_throughput.py $(ARGS)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	touch $@

## make gpu-check OUT=DIR [DATA=../shared/data/mnist]: on a machine with an NVIDIA GPU, run the GPU tests, train on
## cuda and cpu and compare, benchmark; logs, JSON and markdown go to DIR. It uses python3 as it is (no .venv, no
## installs: GPU machines have no network); GPU_PYTHON=... picks another interpreter.
GPU_PYTHON ?= python3
DATA ?= ../shared/data/mnist
gpu-check:
	@test -n "$(OUT)" || { echo "make gpu-check needs OUT=DIR, the directory for its logs and results"; exit 2; }
	$(GPU_PYTHON) benchmarks/gpu_check.py --out '$(OUT)' --data-dir '$(DATA)'

## make gpu-wheels: with network, the pure-Python packages gpunn and its tests import that the GPU machines lack, as
## wheels in .whl/ for their Python (GPU_WHEELS_PYTHON). There: python3 -m pip install --no-index --no-deps --target
## /tmp/site .whl/*.whl, and PYTHONPATH=/tmp/site:$$PWD for make gpu-check.
GPU_WHEELS ?= array-api-compat array-api-strict tqdm
GPU_WHEELS_PYTHON ?= 3.12
gpu-wheels:
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
		--python-version $(GPU_WHEELS_PYTHON) --implementation cp --platform manylinux_2_17_x86_64 -d .whl $(GPU_WHEELS)
