#!/usr/bin/env bash
# GPU acceptance of the Sinkhorn relabel (issue 5) in one run on a machine with one H100: the CuPy tests, then the
# ImageNet-scale benchmark (reference float64 vs ours, warm start, peaked matrix). About 2 minutes on an H100; the
# peaked matrix runs 300 iterations on both sides.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
"$PYTHON" -m pytest tests/sela/test_sinkhorn.py -q -k cupy -x
"$PYTHON" benchmarks/sinkhorn.py --backend cupy --storage bfloat16 --n 1281167 --k 3000
