#!/usr/bin/env bash
# The CUDA check (issue 12): reference, validation and GPTQ on one GPU, for SmolLM2 and a
# Llama-2-7B-shaped model, printing times and peak GPU memory. At most ~8 minutes on one H100.
#
#   bash bench/gpu_check.sh                    # in a venv with this project installed (make install)
#   WHEELS=.whl TOKENIZER=.gpu/tokenizer bash bench/gpu_check.sh   # on a bare GPU image: the few
#       packages it lacks as wheels (installed to /tmp/site), the fixture's tokenizer files beside them
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(command -v .venv/bin/python || command -v python3)}
if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
args=()
[ -n "${TOKENIZER:-}" ] && args+=(--tokenizer "$TOKENIZER")
[ -n "${OUT:-}" ] && args+=(--json "$OUT/gpu_check.json")
exec "$PY" bench/gpu_check.py "${args[@]}" "$@"
