#!/usr/bin/env bash
# `make gpu-check`: run benchmarks/system/gpu_check.py with the machine's own Python, adding what
# `make gpu-bundle` prepared (wheels of the packages that machine lacks, the MiniLM tokenizer)
# from the folder GPU_BUNDLE names (the Makefile passes .gpu; unset: nothing added, as in the
# CPU dry run, whose Python the Python 3.12 wheels would not fit).
# Usage: [GPU_BUNDLE=.gpu] gpu_check.sh OUT [DEVICE] [PYTHON] [extra gpu_check.py flags]
set -euo pipefail
out=${1:?usage: gpu_check.sh OUT [DEVICE] [PYTHON]}
device=${2:-cuda}
python=${3:-python3}
shift $(( $# < 3 ? $# : 3 ))
cd "$(dirname "$0")/../.."
bundle=${GPU_BUNDLE:-}
if [ -n "$bundle" ] && [ -d "$bundle/wheels" ]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ticketserve-site "$bundle"/wheels/*.whl
  export PYTHONPATH=/tmp/ticketserve-site:${PYTHONPATH:-}
fi
if [ -n "$bundle" ] && [ -d "$bundle/tokenizer" ]; then export TICKETSERVE_TOKENIZER=$(cd "$bundle/tokenizer" && pwd); fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
exec "$python" -m benchmarks.system.gpu_check --out "$out" --device "$device" "$@"
