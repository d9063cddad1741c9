"""Named bundles of training settings. Values the user passes on the command line win.

quick: CPU, the default 135M model, 30 min on a 2-core machine by construction: a 30-minute
       --time-budget plans how many of the data's prompts (at most 600 per source, so no source
       dominates the seeded sample) to distill and how many steps to train (passing --steps turns
       the budget off). Short replies, a reduced draft vocabulary (the
       read-out is the CPU's main drafting cost), two unrolled training-time-test steps.
full:  one or more GPUs: all the data, long replies, full vocabulary, three unrolled steps.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        "data": {"max_per_source": 600},
        "distill": {"max_new_tokens": 160, "batch_size": 32},
        "features": {"max_tokens": 400_000, "max_seq_len": 512, "batch_tokens": 2048},
        "train": {
            "steps": 300,
            "batch_tokens": 1024,
            "lr": 1e-3,
            "warmup_steps": 20,
            "unroll": 2,
            "draft_vocab_size": 8192,
            "checkpoint_every": 50,
            "log_every": 10,
            "eval_every": 0,
            "tau_prompts": 2,
            "tau_new_tokens": 64,
        },
        "calibrate": {"tree_nodes": 12, "depth": 5, "batch_tokens": 1024},
        "run": {"held_out": 16, "time_budget": "30m"},
    },
    "full": {
        "data": {"max_per_source": 0},
        "distill": {"max_new_tokens": 512, "batch_size": 64},
        "features": {"max_tokens": 20_000_000, "max_seq_len": 2048, "batch_tokens": 16384},
        "train": {
            "steps": 20_000,
            "batch_tokens": 8192,
            "lr": 5e-4,
            "warmup_steps": 500,
            "unroll": 3,
            "draft_vocab_size": 0,
            "checkpoint_every": 1000,
            "log_every": 20,
            "eval_every": 2000,
            "tau_prompts": 8,
            "tau_new_tokens": 256,
        },
        "calibrate": {"tree_nodes": 60, "depth": 7, "batch_tokens": 8192},
        "run": {"held_out": 200},
    },
}


def preset(name: str | None) -> dict[str, dict[str, Any]]:
    if name is None:
        return {}
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
