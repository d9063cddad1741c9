"""Weights & Biases runs for training and eval: one owner for the modes, the offline rules and resume.

- ``offline`` (the default everywhere): the run is written under ``$WANDB_DIR`` (else the given
  directory) and uploaded later with the ``wandb sync`` command printed at the end. Offline means
  no network: wandb's error reporting (which resolves its analytics endpoint even offline) is
  turned off before wandb is imported.
- ``online``: logs live (needs ``wandb login``); ``disabled``: wandb is not imported at all.
- Resume: the run id is kept in ``<directory>/wandb_run_id``; a resumed job continues that run
  (``resume="allow"``) instead of starting a second one.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

MODES = ("offline", "online", "disabled")
RUN_ID_FILE = "wandb_run_id"


def quiet_wandb_env(mode: str) -> None:
    """Set before ``import wandb``: offline, no network at all (wandb-core's error reporting, which
    reaches its analytics endpoint even offline, off unless the user set it)."""
    if mode == "offline":
        os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")


class Run:
    """A W&B run, or nothing (disabled, or not the main process): every method is then a no-op."""

    def __init__(
        self,
        mode: str,
        project: str,
        directory: Path,
        config: dict[str, Any],
        job_type: str,
        name: str,
        enabled: bool = True,
        resume: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown W&B mode {mode!r}; choose one of {', '.join(MODES)}")
        self.mode, self.run = mode, None
        if mode == "disabled" or not enabled:
            return
        quiet_wandb_env(mode)
        import wandb

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        wandb_dir = Path(os.environ.get("WANDB_DIR") or directory)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        id_file = directory / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else secrets.token_hex(6)
        try:
            self.run = wandb.init(
                project=project,
                mode=mode,
                dir=str(wandb_dir),
                config=config,
                job_type=job_type,
                name=name,
                id=run_id,
                resume="allow",
                reinit="finish_previous",
            )
        except Exception as e:
            raise RuntimeError(
                f"could not start a W&B {mode} run ({e}); use --wandb offline and `wandb sync` "
                "later, or --wandb disabled"
            ) from e
        id_file.write_text(run_id + "\n")

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    @property
    def run_dir(self) -> str | None:
        return str(self.run.settings.sync_dir) if self.run is not None else None

    @property
    def sync_command(self) -> str | None:
        return f"wandb sync {self.run_dir}" if self.run is not None and self.mode == "offline" else None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self, exit_code: int = 0) -> str | None:
        """End the run (``exit_code`` 1 marks it failed); returns the ``wandb sync`` hint offline."""
        hint = self.sync_command
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
        return hint
