#!/usr/bin/env bash
# The GPU check (issue 12, point 6): the tests marked `cuda`, then bench/step_speed.py on CUDA.
# Under 8 minutes on one GPU. On a machine without a CUDA GPU it says so and exits 0.
#   bench/gpu_check.sh            (from the repository root; PY=... to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible to torch; skipped"
    exit 0
fi
"$PY" -c "import torch; print('gpu_check:', torch.__version__, torch.cuda.get_device_name(0), torch.cuda.device_count(), 'GPU(s)')"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 300 "$PY" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 200 "$PY" bench/step_speed.py --device cuda --repeats 5 --steps 100
