"""Shared test set-up.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, at
collection time, whenever no CUDA device is present: the kernels then run (slowly) on the CPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
