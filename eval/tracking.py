"""Weights & Biases logging for an eval: config, live per-question speeds, summary, table, plots.

Modes, offline rules and resume are ``selfspec.tracking``'s: offline by default, under
``$WANDB_DIR`` (else the eval's ``--out``), uploaded later with ``wandb sync``; a resumed eval
(``--resume``) continues its run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfspec.tracking import MODES, Run

__all__ = ["MODES", "TABLE_COLUMNS", "Tracker"]
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


class Tracker(Run):
    """The eval's W&B run: live per-question speeds, then the summary, the records table and plots."""

    def __init__(self, mode: str, project: str, out_dir: Path, config: dict[str, Any], resume: bool = False):
        name = f"eval-{Path(out_dir).name}"
        super().__init__(mode, project, out_dir, config, job_type="eval", name=name, resume=resume)

    def log_question(self, records: list[dict[str, Any]]) -> None:
        self.log({f"{r['method']}/tokens_per_s": r["tokens_per_s"] for r in records if r["turn"] == 1})

    def finish_eval(self, results: dict[str, Any], out_dir: Path) -> None:
        if self.run is None:
            return
        import wandb

        summary = {
            f"{m}/{k}": v
            for m, agg in results["summary"].items()
            for k, v in agg.items()
            if isinstance(v, (int, float)) and v is not None
        }
        self.summary({**summary, "complete": results["complete"]})
        rows = [[r.get(c) for c in TABLE_COLUMNS] for r in results["records"]]
        images = {f"plots/{Path(p).stem}": wandb.Image(str(out_dir / p)) for p in results["files"]["plots"]}
        self.log({"questions": wandb.Table(columns=list(TABLE_COLUMNS), data=rows), **images})
        self.finish()

    def abort(self) -> None:
        """Close the run after an error or interrupt (marked failed; the log keeps what finished)."""
        self.finish(exit_code=1)
