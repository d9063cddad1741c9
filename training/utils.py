"""Small pieces every training stage shares: process group view, atomic files, progress bars, RNG.

``Dist`` is the only thing stages know about distribution: rank, world size, a barrier. It comes
from ``accelerate.Accelerator`` under ``accelerate launch``/``torchrun`` and is a single process
otherwise, so every stage runs unchanged on one CPU and on several GPUs.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
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
