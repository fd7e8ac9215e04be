#!/usr/bin/env bash
# Every GPU check of the project in one go, for a session that is lent a GPU machine. NEVER RUN
# YET: it was written without a GPU (issue 12); expect to fix small things on its first run.
#
#   bash scripts/gpu_checks.sh [OUT_DIR]          (default OUT_DIR: $OUT, else gpu-results/)
#
# 1. finds a Python with a CUDA torch ($PYTHON, .venv-cuda/bin/python, python3) and the test
#    tools (pytest, hypothesis, triton), and records the GPU, driver and versions;
# 2. builds the whole extension for this GPU's architecture into build-cuda/ (out of tree:
#    pyext/_C*.so, the CPU build, is left alone; incremental when build-cuda/ is already there);
# 3. runs the CUDA tests (-m cuda) and the Triton tests compiled for the GPU (no interpreter);
# 4. runs benchmarks/bench_gpu.py: smoothed_nll GB/s against the HBM peak, the fused head against
#    the GEMM (+ F.cross_entropy, Liger, cut-cross-entropy where they import), Hadamard and gram
#    against torch, all on this GPU.
# Each step logs to OUT_DIR/<step>.log; a failing step does not stop the later ones; the exit
# status is the number of failed steps. OUT_DIR/summary.txt lists them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu-results}}"
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
failures=0

step() {  # step NAME COMMAND...: run, log, record pass/fail with the wall time
  local name="$1"; shift
  local t0=$SECONDS
  echo "== $name: $*" | tee -a "$SUMMARY"
  if "$@" > "$OUT_DIR/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - t0)) s)" | tee -a "$SUMMARY"
  else
    echo "   FAILED ($((SECONDS - t0)) s): tail of $OUT_DIR/$name.log" | tee -a "$SUMMARY"
    tail -n 30 "$OUT_DIR/$name.log" | sed 's/^/   | /' | tee -a "$SUMMARY"
    failures=$((failures + 1))
  fi
}

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in .venv-cuda/bin/python python3 python; do
    if command -v "$cand" > /dev/null 2>&1 && "$cand" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
      PY="$cand"; break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "no Python with a CUDA torch and a visible GPU (set PYTHON=...); nothing run" | tee -a "$SUMMARY"
  exit 1
fi

environment() {
  nvidia-smi || true
  "$PY" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "device", torch.cuda.get_device_name(0),
      "capability", torch.cuda.get_device_capability(0))
for mod in ("triton", "pytest", "hypothesis", "numpy", "scipy", "constriction", "cut_cross_entropy", "liger_kernel"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as err:  # noqa: BLE001
        print(mod, "MISSING", type(err).__name__)
EOF
  command -v nvcc && nvcc --version | tail -n 2
}
step environment environment

ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
build() {  # incremental (ninja); also refreshes the Python files copied into build-cuda/lib
  local cuda_home="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}"
  local nv
  nv=$("$PY" -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13'))" 2> /dev/null || true)
  CUDA_HOME="$cuda_home" CPATH="${nv:+$nv/include}${CPATH:+:$CPATH}" TORCH_CUDA_ARCH_LIST="$ARCH" \
    MAX_JOBS="${MAX_JOBS:-8}" "$PY" setup.py -q build --build-base build-cuda --build-lib build-cuda/lib
}
step build build
export PYTHONPATH="$PWD/build-cuda/lib${PYTHONPATH:+:$PYTHONPATH}"
step check_cuda_build "$PY" scripts/check_cuda_build.py

# -m overrides pyproject's "not slow and not cuda"; conftest leaves TRITON_INTERPRET unset on a GPU.
step cuda_tests env -u TRITON_INTERPRET "$PY" -m pytest -q -rs -m cuda tests/
step triton_tests env -u TRITON_INTERPRET "$PY" -m pytest -q -rs -m "triton and not slow" \
  tests/test_triton_losses.py tests/test_hadamard.py tests/test_gram.py
step bench_gpu env -u TRITON_INTERPRET "$PY" benchmarks/bench_gpu.py --out "$OUT_DIR"

echo "$failures step(s) failed; logs and bench_gpu.md in $OUT_DIR" | tee -a "$SUMMARY"
exit "$failures"
