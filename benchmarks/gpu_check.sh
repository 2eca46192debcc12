#!/usr/bin/env bash
# `make gpu-check`: run benchmarks/gpu_check.py with the machine's own Python, adding what
# `make gpu-bundle` prepared in .gpu/ (wheels of the packages that machine lacks, the MiniLM
# tokenizer) when present. Usage: gpu_check.sh OUT [DEVICE] [PYTHON] [extra gpu_check.py flags]
set -euo pipefail
out=${1:?usage: gpu_check.sh OUT [DEVICE] [PYTHON]}
device=${2:-cuda}
python=${3:-python3}
shift $(( $# < 3 ? $# : 3 ))
cd "$(dirname "$0")/.."
if [ -d .gpu/wheels ]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ticketserve-site .gpu/wheels/*.whl
  export PYTHONPATH=/tmp/ticketserve-site:${PYTHONPATH:-}
fi
if [ -d .gpu/tokenizer ]; then export TICKETSERVE_TOKENIZER=$PWD/.gpu/tokenizer; fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
exec "$python" benchmarks/gpu_check.py --out "$out" --device "$device" "$@"
