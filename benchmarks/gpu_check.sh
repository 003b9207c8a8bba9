#!/usr/bin/env bash
# The one prepared GPU check of issue 13 (benchmarks/gpu_check.py says what it measures).
#
# Here, once: scripts/device-wheels   (fills .whl/ with the packages the device machine lacks)
# Then, with the device tool, from the repository root (≤ 8 minutes of device time, start-up aside):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# The reply's files: gpu_check.json, gpu_check.md (the table), log.txt, nvidia-smi.txt. Then give_back.
#
# The device's python3 (3.12) has torch, transformers, timm, opencv, scikit-image but not diffusers,
# torchao, facexlib or facenet-pytorch: those come from .whl/, installed beside it (no index there).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/gpu-check-site}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || echo "installing the carried wheels failed: the check will skip what needs them"
  export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no .whl/ folder: run scripts/device-wheels here and carry .whl"
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
export PYTHONUNBUFFERED=1
# The driver stops starting measurements after --budget-s; the timeout is the backstop.
timeout -k 10 470 "$PYTHON" benchmarks/gpu_check.py --out "$OUT" --budget-s 400 "$@" 2>&1 | tee "$OUT/log.txt"
