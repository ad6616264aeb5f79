#!/usr/bin/env bash
# Issue 29's speed figures in one run, side by side: whole-slide prediction (the x8 student's stream
# rate against the teacher's, benchmarks/bench_slide.py) and student inference at 112/56/28 px
# against PyTorch and the exported TFLite student (benchmarks/bench_step.py). Run from the
# repository root on a quiet machine; needs `vips` (apt-get install libvips-tools) and a separate
# PyTorch environment (TORCH_PYTHON, default /tmp/torchvenv/bin/python; never the project's .venv).
set -euo pipefail
TORCH_PYTHON=${TORCH_PYTHON:-/tmp/torchvenv/bin/python}
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), load average: $(cut -d' ' -f1-3 /proc/loadavg)"
PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_slide.py --models=teacher,x2,x4,x8 --repeats=3
PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_step.py --modes= --factors= \
    --infer_px=112,56,28 --compare_torch --torch_python="$TORCH_PYTHON" --tflite \
    --steps=20 --repeats=5
echo "# done $(date -u '+%H:%M UTC'), load average: $(cut -d' ' -f1-3 /proc/loadavg)"
