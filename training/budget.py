"""Plan a training run to fit a wall-clock budget (``selfspec train --time-budget``).

The run's cost is nearly linear in three quantities this module chooses: prompts distilled
(each costs its reply at the distillation rate, then prompt + reply at the feature-capture rate),
and optimizer steps (each costs ``batch_tokens`` rows at the training rate). The rates are
measured on this machine by a short probe of the real stages (``selfspec.training.pipeline``);
this module is only the arithmetic, so it is tested without timing anything.

Given the budget, the fixed costs (model load, calibration, held-out tau, the distillation
check) and the rates, the plan spends what is left on as many prompts as the data offers, each
seen ``epochs`` times in training; if the data runs out first, the rest goes to more steps.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Seconds in ``"7200"``, ``"90m"``, ``"2h"`` or ``"1h30m"``; a clear error otherwise."""
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        seconds = float(s)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", s)
        if not parts or "".join(n + u for n, u in parts) != s:
            raise ValueError(f"time budget {text!r} is not a duration; write e.g. 7200, 90m, 2h or 1h30m")
        seconds = sum(float(n) * UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"time budget must be positive, got {text!r}")
    return seconds


@dataclass(frozen=True)
class Rates:
    """Measured throughput of the stages on this machine."""

    distill_tok_s: float  # reply tokens per second, batched distillation
    capture_tok_s: float  # sequence tokens (prompt + reply) per second, feature capture
    train_rows_s: float  # training rows (tokens) per second


@dataclass(frozen=True)
class Plan:
    prompts: int  # prompts to distill and train on
    steps: int  # optimizer steps
    epochs: float  # times each training token is seen
    seconds: dict[str, float]  # planned seconds per stage, and "total"
    limited_by: str  # "budget" (more data was available) or "data" (every prompt is used)

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v / 60:.1f} min" for k, v in self.seconds.items() if k != "total")
        return (
            f"time budget plan: {self.prompts} prompts, {self.steps} steps ({self.epochs:.1f} epochs), "
            f"{self.seconds['total'] / 60:.1f} min ({parts}); limited by {self.limited_by}"
        )


def plan(
    budget_s: float,
    rates: Rates,
    *,
    available_prompts: int,
    prompt_tokens: float,
    reply_tokens: float,
    batch_tokens: int,
    fixed_s: float,
    epochs: float = 3.0,
    min_prompts: int = 8,
    max_tokens: int | None = None,
) -> Plan:
    """Prompts and steps that fill ``budget_s``: ``fixed_s`` first, then per prompt its distillation,
    capture and ``epochs`` passes of training. ``prompt_tokens`` / ``reply_tokens`` are the expected
    lengths per prompt (mean prompt length, and the reply length distillation will reach on
    average); ``max_tokens`` caps the prompts at what the feature cache may hold. Raises when the
    budget cannot hold ``min_prompts``."""
    if min(rates.distill_tok_s, rates.capture_tok_s, rates.train_rows_s) <= 0:
        raise ValueError(f"rates must be positive, got {rates}")
    seq = prompt_tokens + reply_tokens
    if max_tokens is not None:
        available_prompts = min(available_prompts, math.floor(max_tokens / seq))
    data_per_prompt = reply_tokens / rates.distill_tok_s + seq / rates.capture_tok_s
    train_per_prompt = epochs * seq / rates.train_rows_s
    usable = budget_s - fixed_s
    fits = math.floor(usable / (data_per_prompt + train_per_prompt)) if usable > 0 else 0
    if fits < min_prompts or available_prompts < min_prompts:
        need = fixed_s + min_prompts * (data_per_prompt + train_per_prompt)
        raise ValueError(
            f"a time budget of {budget_s / 60:.1f} min cannot fit {min_prompts} prompts on this machine "
            f"(needs about {need / 60:.1f} min at the measured rates) or the data has fewer; "
            "raise --time-budget (or --max-feature-tokens), or add --data"
        )
    prompts = min(fits, available_prompts)
    limited_by = "budget" if fits < available_prompts else "data"
    data_s = prompts * data_per_prompt
    train_s = usable - data_s  # what is left trains: exactly `epochs` when budget-limited, more if not
    steps = max(1, math.floor(train_s * rates.train_rows_s / batch_tokens))
    seconds = {
        "fixed": fixed_s,
        "distill": prompts * reply_tokens / rates.distill_tok_s,
        "features": prompts * seq / rates.capture_tok_s,
        "train": steps * batch_tokens / rates.train_rows_s,
    }
    seconds["total"] = sum(seconds.values())
    return Plan(prompts, steps, steps * batch_tokens / (prompts * seq), seconds, limited_by)
