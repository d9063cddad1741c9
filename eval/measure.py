"""What one timed generation is measured with, and the record of where it ran.

- ``StepTimer``: a transformers-style streamer (``put``/``end``) handed to every method, HF and
  selfspec alike, so that time to first token and tokens per target forward are measured the same
  way for all of them. Both ``model.generate`` and ``selfspec.generate`` put the prompt first,
  then the tokens of each forward as they are committed: the first ``put`` after the prompt is the
  first token the user would see. (On CUDA, transformers >= 5.2 streams one step late through its
  asynchronous stop check, which adds one decode step to HF's TTFT there.)
- ``PeakMemory``: CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the
  process's peak resident set (``VmHWM``), reset before each run by writing ``5`` to
  ``/proc/self/clear_refs`` (Linux); where that cannot be reset the value is the process's peak
  so far (``getrusage``), and ``kind`` says so.
- ``environment()``: device, CPU/GPU name, library versions, dtype, threads, git commit, command.
"""

from __future__ import annotations

import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class StepTimer:
    """Streamer that records when the first new token arrives and how many tokens each put holds."""

    start: float = 0.0  # perf_counter() when the request was issued
    first_token_s: float | None = None  # seconds from start to the first put after the prompt
    step_tokens: list[int] = field(default_factory=list)  # tokens per put after the prompt
    _saw_prompt: bool = False

    def put(self, tokens: torch.Tensor) -> None:
        if not self._saw_prompt:
            self._saw_prompt = True
            return
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.start
        self.step_tokens.append(int(tokens.numel()))

    def end(self) -> None:
        pass


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory over one run: CUDA allocated bytes, or CPU peak RSS bytes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            self.kind = "cpu_peak_rss_since_start"

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = _vm_hwm_bytes() if self.kind == "cpu_peak_rss" else None
        if hwm is not None:
            return hwm
        self.kind = "cpu_peak_rss_since_start"
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def param_bytes(module: torch.nn.Module | None) -> int:
    """Bytes of a module's own parameters and buffers (a drafter's shared embedding and lm_head
    are not registered on it, so they are not counted)."""
    if module is None:
        return 0
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except (ImportError, AttributeError):  # absent optional package: not recorded
        return None


def git_commit(root: Path | None = None) -> dict[str, Any] | None:
    """The project's commit and whether the tree had uncommitted changes (read-only git calls)."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device, dtype: torch.dtype, argv: list[str] | None = None) -> dict[str, Any]:
    """Where and with what a result was measured."""
    import transformers

    import selfspec

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "device": str(device),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "cuda": torch.version.cuda if gpu else None,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": _version("triton"),
        "selfspec": selfspec.__version__,
        "git": git_commit(),
        "command": shlex.join(argv if argv is not None else sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
