#!/usr/bin/env bash
# Create .venv and install gradlore with its test extras and the peer packages used as test oracles.
# torch is installed first, pinned, so that nothing pulls a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
# The peers (test-time oracles) declare loose deps that we already satisfy; install them without deps.
.venv/bin/python -m pip install -q --no-deps galore-torch==1.0 fira==1.0.2 q-galore-torch==1.0 apollo-torch==1.0.3
.venv/bin/python -c "import torch, gradlore; print('gradlore', gradlore.__version__, 'torch', torch.__version__)"
