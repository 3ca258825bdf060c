#!/usr/bin/env bash
# Create .venv and install gradlore with its test extras and the peer packages used as test oracles.
# torch is installed first, pinned, so that nothing pulls a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# Later installs are constrained to that torch: a package that wants another one makes pip fail, never replace it.
printf 'torch==%s\n' "${TORCH_VERSION:-2.13.0}" > .venv/torch-constraint.txt
# The Hugging Face stack (gradlore.hf, --optimizer lora, gradlore eval --tasks) pinned at the versions tested;
# tests/test_hf_trainer.py, test_lora.py and test_hf_export.py import them unconditionally (they fail, never skip).
.venv/bin/python -m pip install -q -c .venv/torch-constraint.txt -e ".[dev,hf]" \
  transformers==5.24.0 accelerate==1.15.0 peft==0.21.2 lm-eval==0.4.13
.venv/bin/python -c "import peft, lm_eval, accelerate, transformers; from lm_eval.models.huggingface import HFLM"
# The peers (test-time oracles) declare loose deps that we already satisfy; install them without deps.
.venv/bin/python -m pip install -q --no-deps galore-torch==1.0 fira==1.0.2 q-galore-torch==1.0 apollo-torch==1.0.3 \
  ista-daslab-optimizers==1.1.15
.venv/bin/python -c "import torch, gradlore; print('gradlore', gradlore.__version__, 'torch', torch.__version__)"
