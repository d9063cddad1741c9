"""Weights & Biases for training runs: offline by default, online by choice, ``disabled`` = no wandb.

Offline runs are written under ``$WANDB_DIR`` (else the work directory) and uploaded later with
the ``wandb sync`` command printed at the end. Only the main process logs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MODES = ("offline", "online", "disabled")


class TrainTracker:
    def __init__(
        self,
        mode: str,
        project: str,
        work_dir: Path,
        config: dict[str, Any],
        enabled: bool = True,
        name: str | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown W&B mode {mode!r}; choose one of {', '.join(MODES)}")
        self.mode, self.run = mode, None
        if mode == "disabled" or not enabled:
            return
        import wandb

        directory = Path(os.environ.get("WANDB_DIR") or work_dir)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=project,
                mode=mode,
                dir=str(directory),
                config=config,
                job_type="train",
                name=name or f"train-{Path(work_dir).name}",
                reinit="finish_previous",
            )
        except Exception as e:
            raise RuntimeError(
                f"could not start a W&B {mode} run ({e}); use --wandb offline and `wandb sync` "
                "later, or --wandb disabled"
            ) from e

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    @property
    def sync_command(self) -> str | None:
        if self.run is None or self.mode != "offline":
            return None
        return f"wandb sync {self.run.settings.sync_dir}"

    def finish(self) -> str | None:
        """End the run; returns the ``wandb sync`` hint for offline runs."""
        hint = self.sync_command
        if self.run is not None:
            self.run.finish()
            self.run = None
        return hint
