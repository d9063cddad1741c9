"""Small pieces every training stage shares: process group view, atomic files, progress bars, RNG.

``Dist`` is the only thing stages know about distribution: rank, world size, a barrier. It comes
from ``accelerate.Accelerator`` under ``accelerate launch``/``torchrun`` and is a single process
otherwise, so every stage runs unchanged on one CPU and on several GPUs.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    barrier: Callable[[], None]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def single() -> Dist:
        return Dist(rank=0, world_size=1, barrier=lambda: None)

    @staticmethod
    def from_accelerator(accelerator: Any) -> Dist:
        return Dist(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone)


def umask_mode(directory: bool = False) -> int:
    """The mode a plain ``open``/``mkdir`` would give (mkstemp/mkdtemp use 0600/0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def publish(path: Path) -> None:
    """Give ``path`` (a directory: and its files) the modes a plain write would have given."""
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, umask_mode(directory=p.is_dir()))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temp file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def progress(total: int, desc: str, unit: str, disable: bool = False):
    """A tqdm bar with rate and ETA (the stage's own unit: prompts, tokens, steps)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, smoothing=0.1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from (Python, torch CPU, CUDA), for checkpoints."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
