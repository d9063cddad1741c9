"""Compile a kernel's C source once into ``$SELFSPEC_CACHE/kernels`` and load it with ctypes.

The sources have no torch headers, so a build takes about a second with the system C compiler.
The file name carries a hash of the source, the compiler and the flags; the write is atomic, so a
killed build never leaves a half-written library behind.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = [
    "-O3",
    "-shared",
    "-fPIC",
    "-std=gnu11",
    "-ffp-contract=off",
]  # no silent FMA: the order is the point


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cache_dir() -> Path:
    return Path(os.environ.get("SELFSPEC_CACHE") or Path.home() / ".cache" / "selfspec") / "kernels"


def build(source: Path) -> ctypes.CDLL:
    """Compile ``source`` (cached) and load it; raises RuntimeError with the compiler's message."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    text = source.read_bytes()
    digest = hashlib.sha256(text + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    out = cache_dir() / f"{source.stem}-{digest}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            done = subprocess.run(
                [compiler, *FLAGS, "-o", tmp, str(source), "-lm"], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed to build {source.name}: {done.stderr.strip()[-500:]}")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(out))


class Kernel:
    """One C kernel: built and loaded on first use where the CPU has ``needs`` (flag names from
    /proc/cpuinfo) and ``SELFSPEC_CPU_KERNELS`` is not 0; ``reason`` says why it is not available.
    ``signatures`` maps each C function to its ctypes (argtypes, restype)."""

    def __init__(self, source: Path, needs: set[str], signatures: dict[str, tuple[list, object]]):
        self.source, self.needs, self.signatures = source, needs, signatures
        self.lib: ctypes.CDLL | None = None
        self.reason: str | None = None

    def available(self) -> bool:
        if self.lib is not None or self.reason is not None:
            return self.lib is not None
        missing = sorted(self.needs - cpu_flags())
        if os.environ.get("SELFSPEC_CPU_KERNELS", "1").strip() == "0":
            self.reason = "SELFSPEC_CPU_KERNELS=0"
        elif missing:
            self.reason = f"this CPU lacks {', '.join(missing)}"
        else:
            try:
                lib = build(self.source)
                for name, (argtypes, restype) in self.signatures.items():
                    getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, restype
                self.lib = lib
            except (OSError, RuntimeError) as err:
                self.reason = str(err)
        return self.lib is not None
