"""Weights & Biases logging for an eval: config, live per-question speeds, summary, table, plots.

Offline by default: the run is written under ``$WANDB_DIR`` (else the eval's ``--out``) and
``wandb sync <run dir>`` uploads it later. ``disabled`` does not import wandb at all. Each
invocation is its own W&B run (a resumed eval logs a new run holding the full results).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MODES = ("offline", "online", "disabled")
TABLE_COLUMNS = (
    "key",
    "category",
    "turn",
    "method",
    "new_tokens",
    "tokens_per_s",
    "wall_s",
    "ttft_s",
    "tau",
    "exact_match",
    "text",
)


class Tracker:
    def __init__(self, mode: str, project: str, out_dir: Path, config: dict[str, Any]):
        if mode not in MODES:
            raise ValueError(f"unknown W&B mode {mode!r}; choose from {', '.join(MODES)}")
        self.mode, self.run = mode, None
        if mode == "disabled":
            return
        import wandb

        directory = Path(os.environ.get("WANDB_DIR") or out_dir)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=project,
                mode=mode,
                dir=str(directory),
                config=config,
                job_type="eval",
                name=f"eval-{Path(out_dir).name}",
            )
        except Exception as e:  # wandb raises its own error types (auth, network)
            raise RuntimeError(
                f"could not start a W&B {mode} run ({e}); use --wandb offline and `wandb sync` "
                "later, or --wandb disabled"
            ) from e

    @property
    def run_dir(self) -> str | None:
        return str(self.run.settings.sync_dir) if self.run is not None else None

    @property
    def sync_command(self) -> str | None:
        return f"wandb sync {self.run_dir}" if self.run is not None and self.mode == "offline" else None

    def log_question(self, records: list[dict[str, Any]]) -> None:
        if self.run is None:
            return
        self.run.log({f"{r['method']}/tokens_per_s": r["tokens_per_s"] for r in records if r["turn"] == 1})

    def finish(self, results: dict[str, Any], out_dir: Path) -> None:
        if self.run is None:
            return
        import wandb

        summary = {
            f"{m}/{k}": v
            for m, agg in results["summary"].items()
            for k, v in agg.items()
            if isinstance(v, (int, float)) and v is not None
        }
        self.run.summary.update({**summary, "complete": results["complete"]})
        rows = [[r.get(c) for c in TABLE_COLUMNS] for r in results["records"]]
        images = {f"plots/{Path(p).stem}": wandb.Image(str(out_dir / p)) for p in results["files"]["plots"]}
        self.run.log({"questions": wandb.Table(columns=list(TABLE_COLUMNS), data=rows), **images})
        self.run.finish()

    def abort(self) -> None:
        """Close the run after an error or interrupt (marked failed; the log keeps what finished)."""
        if self.run is not None:
            self.run.finish(exit_code=1)
            self.run = None
