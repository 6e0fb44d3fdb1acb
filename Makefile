# omni-train: `make demo` and `make test` create .venv when it is absent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out

export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-fast lint bench clean-demo

venv: $(STAMP)

# Torch goes first so that deepspeed and the range in pyproject.toml keep this CPU build
# instead of pulling a CUDA one. The stamp makes re-runs instant until pyproject changes.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,annotate,eval,foundation]"
	# MediaPipe's metadata pins protobuf<5 and numpy<2, which wandb and torch outgrow; it runs
	# with both (data_pipelines/annotators/mediapipe_compat.py), so it goes in without deps.
	$(PY) -m pip install -q --no-deps "mediapipe==0.10.21"
	touch $(STAMP)

demo: $(STAMP)
	DEMO_DIR=$(DEMO_DIR) PY=$(PY) bash launch/demo.sh

test: $(STAMP)
	$(PY) -m pytest -q --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	@set -e; for script in benchmarks/bench_*.py; do \
	  [ -e "$$script" ] || { echo "no benchmarks yet"; break; }; \
	  echo "== $$script"; $(PY) "$$script"; done

lint: $(STAMP)
	$(VENV)/bin/ruff check omni_train data_pipelines tests benchmarks
	$(VENV)/bin/ruff format --check omni_train data_pipelines tests benchmarks

clean-demo:
	rm -rf $(DEMO_DIR)
