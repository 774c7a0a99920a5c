#!/bin/bash
# benchmarks/gpu.py on a lent GPU machine, its result JSON written to $OUT. With a folder made by
# `python scripts/device/minilm.py pack .gpu/minilm` carried along (.gpu/ is not in git: list it
# in .git/info/exclude and pass carry=[".gpu"]), the bundled model's text encoder is restored
# first, so the sampling rows run too:
#     bash scripts/device/gpu_benchmark.sh [.gpu/minilm] [BUDGET_SECONDS]
set -u
export PYTHONPATH=$PWD/src:/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L
if [ -n "${1:-}" ]; then python3 scripts/device/minilm.py restore "$1" /tmp/site || exit 1; fi
cd benchmarks && IMAGEN_BENCH_RESULTS=${OUT:-results} timeout $(( ${2:-270} + 30 )) \
    python3 gpu.py --budget "${2:-270}" 2>&1 | grep -v "Loading weights"
