# Set-up and everyday commands. `make demo` and `make test` each create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_REGISTRY ?= $(CURDIR)/.demo/registry
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-all bench-quality clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: BitFit on SST-2 with the bundled MiniLM and sample,
# published to a local registry, evaluated on the full SST-2 dev set, then used to predict.
demo: $(STAMP)
	$(BIN)/ticketserve train --method bitfit --task sst2 --data-dir sample --epochs 3 --registry $(DEMO_REGISTRY)
	$(BIN)/ticketserve registry list --registry $(DEMO_REGISTRY)
	$(BIN)/ticketserve eval sst2-bitfit --data-dir sample --registry $(DEMO_REGISTRY)
	$(BIN)/ticketserve predict sst2-bitfit --registry $(DEMO_REGISTRY) \
		"a gorgeous, witty, seductive movie." "the plot is nothing but boilerplate clichés." \
		"it's not a bad film, just a forgettable one."

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

bench-quality: $(STAMP)
	$(BIN)/python benchmarks/quality.py --tasks sst2 --methods full,bitfit --train-samples 8000

clean:
	rm -rf $(VENV) .demo .pytest_cache
