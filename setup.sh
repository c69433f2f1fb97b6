#!/usr/bin/env bash
# Sets up (or reuses) .venv, installs torch and the other dependencies, and builds
# the extension in place (incremental after the first build). Needs only python3
# and a C++ compiler; nvcc and a CUDA build of torch add the CUDA kernels.
#   TORCH_SPEC   which torch to install when .venv has none (default below)
#   FORCE_CPU=1 / FORCE_CUDA=1 / TORCH_CUDA_ARCH_LIST / MAX_JOBS   see setup.py
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch>=2.4,<2.15"}

if [ ! -x .venv/bin/python ]; then
  echo "setup.sh: creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "setup.sh: installing $TORCH_SPEC (several minutes the first time)"
  "$VPY" -m pip install -q --upgrade pip setuptools wheel
  "$VPY" -m pip install -q "$TORCH_SPEC"
fi
"$VPY" -m pip install -q numpy pytest pytest-benchmark hypothesis tqdm matplotlib scikit-learn ninja \
  pytorch-metric-learning info-nce-pytorch mlxtend==0.25.0 \
  2>&1 | grep -v "^WARNING: Location" || true

# Build in place: ninja makes rebuilds incremental (seconds when nothing changed).
# NB: a .pth file puts the checkout on the venv's path, which is what an editable
# install does, without pip's full rebuild on every run.
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$VPY" setup.py -q build_ext --inplace 2>&1 | grep -E "infomax_ext|error|Error" || true
"$VPY" - <<'PYEOF'
import os, site, sys
root = os.getcwd()
with open(os.path.join(site.getsitepackages()[0], "infomax_ext-checkout.pth"), "w") as f:
    f.write(root + "\n")
import infomax_ext
info = infomax_ext.build_info()
print(f"setup.sh: infomax_ext {infomax_ext.__version__}, backend={infomax_ext.backend()}, "
      f"compiled backends={info.get('backends')}, cuda archs={info.get('cuda_archs', '-')}")
sys.exit(0 if infomax_ext.backend() == "compiled" else 1)
PYEOF
