# Two commands set up a fresh machine: `make demo` and `make test`. Both install into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# torch and torchvision come from this machine's local wheels; any torch >= 2.4 works (pyproject has no exact pin)
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo demo-standard test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e ".[dev,tracking]"
	# test-only: an independent attack implementation to check ours against; --no-deps because it pins an old
	# requests (what it really needs, numpy/scipy/tqdm, is already here)
	$(BIN)/pip install -q --no-deps torchattacks==3.5.1
	touch $(STAMP)

# The main job on the embedded digits dataset; writes runs/demo/digits_fgsm_sdi (replaced on each demo).
demo: install
	$(BIN)/raydist train jobs/digits_fgsm_sdi.yaml --set run.output_dir=runs/demo --overwrite

# The same model trained without adversarial examples, for comparison.
demo-standard: install
	$(BIN)/raydist train jobs/digits_standard.yaml --set run.output_dir=runs/demo --overwrite

test: install
	$(BIN)/pytest -q

# Training throughput (raydist train with one Ray Train worker beside a plain PyTorch loop of the same method),
# evaluation throughput (images/s per attack with 1, 2, 4 actors, fp32 and bf16), where a step's time goes (PyTorch
# profiler), JPEG decoding images/s per core (plain vs draft) and, on a GPU, peak memory and the largest batch: on a GPU the H100 reference setting, on CPU a small
# model. Writes bench/results/*.json. (On the project's GPU machine without a .venv: bench/gpu_check.sh.)
bench: install
	if $(BIN)/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
	  $(BIN)/python bench/train_throughput.py --gpu && \
	  $(BIN)/python bench/eval_throughput.py --synthetic --width 64 --samples 8192 --gpu --actors 1,2,4 \
	    --precision fp32,bf16 && \
	  $(BIN)/python bench/profile_step.py --gpu && \
	  $(BIN)/python bench/memory.py --gpu && \
	  $(BIN)/python bench/decode.py; \
	else \
	  $(BIN)/python bench/train_throughput.py && \
	  $(BIN)/python bench/eval_throughput.py --synthetic --width 16 --samples 256 --actors 1,2 && \
	  $(BIN)/python bench/profile_step.py && \
	  $(BIN)/python bench/decode.py; \
	fi

lint: install
	$(BIN)/ruff check raydist tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
