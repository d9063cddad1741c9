"""What an eval writes to its output directory, and how an interrupted one is resumed.

Files in ``--out DIR``:
- ``state.json``: the settings that decide the results (``fingerprint``) and one environment
  record per invocation (``sessions``). ``--resume`` refuses a DIR whose fingerprint differs.
- ``records.jsonl``: the append-as-you-go log, one line per finished question
  ``{"key", "session", "records": [Record, ...]}``, flushed and fsynced after each question. A
  torn last line (a crash mid-write) is ignored, so that question is simply run again.
- ``results.json``, ``report.md``, ``*.png``: rebuilt from the log at the end (written to a temp
  file, then ``os.replace``), so they are never half-written.

``results.json`` schema (``schema_version`` 1)::

    {
      "schema_version": 1,
      "complete": bool,              # every selected question finished
      "config": {...},               # EvalConfig fields (model, drafter, methods, max_new_tokens,
                                     #  temperature, top_p, top_k, seed, tree, acceptance, turns,
                                     #  limit, repeats, ...)
      "environment": [Env, ...],     # one per invocation; Record.session indexes it
      "models": {"target": {"name", "dtype", "param_bytes"},
                 "drafter": {"name", "kind", "param_bytes", "overhead_vs_target"} | null,
                 "assistant": {"name", "param_bytes"} | null},
      "memory_kind": "cpu_peak_rss" | "cpu_peak_rss_since_start" | "cuda_max_allocated",
      "summary": {method: Aggregate},
      "by_category": {category: {method: Aggregate}},
      "mismatches": [{"key", "category", "turn", "method", "position", "ref_token", "token",
                      "margin", "gap", "runner_up", "verdict"}],
      "records": [Record, ...],
      "files": {"records": "records.jsonl", "report": "report.md", "plots": [png, ...]},
      "wandb": {"mode", "run_dir", "sync_command"}
    }
    Env = {device, cpu, cpu_count, gpu, cuda, dtype, torch_threads, torch_interop_threads, python,
           platform, torch, transformers, triton, selfspec, git: {commit, dirty} | null, command,
           started}
    Record (one per method per question per turn) = {
      "key", "question_id", "category", "source", "turn" (1-based), "method", "session",
      "prompt_tokens", "new_tokens", "tokens": [int] (first repeat), "text",
      "wall_s", "tokens_per_s", "ttft_s", "prefill_s" | null,      # medians over repeats
      "peak_mem_bytes",                                            # max over repeats
      "runs": [{"wall_s", "ttft_s", "new_tokens", "peak_mem_bytes", "order",   # each repeat
                "tree_nodes" (nodes verified per step; null for hf/pld/assisted)}],
      "steps", "tau", "accepted_hist": [int], "accepted_by_depth": [float] | null,
      "same_across_repeats": bool,
      "exact_match": bool | null,    # greedy only, against the hf record of the same turn
      "mismatch": {"position", "ref_token", "token", "margin", "gap", "runner_up", "verdict"} | null
    }
    Aggregate = {"requests", "new_tokens", "wall_s", "tokens_per_s", "speedup_vs_hf",
      "speedup_vs_engine", "tau", "steps", "accepted_hist", "accepted_by_depth",
      "latency_p50_s", "latency_p95_s", "ttft_p50_s", "ttft_p95_s", "prefill_p50_s",
      "peak_mem_bytes", "exact_match_rate", "mismatches", "near_ties"}

Conventions: ``tokens_per_s`` of an aggregate is total new tokens over total (median) wall time;
speedups are ratios of those throughputs. ``tau`` is tokens per verifying target forward: for
engine/selfspec from ``Stats`` (the prefill forward, which always yields one token, is not a
verify step); for hf/pld/assisted from the streamer, where every forward counts (pld/assisted
verify drafts already in the first one). ``accepted_hist[k]`` = forwards that produced k tokens;
``accepted_by_depth[d-1]`` = share of verify steps that kept a drafted token at depth d
(selfspec only). ``ttft_s`` = time to the first streamed token, the same streamer for every
method; ``prefill_s`` = ``Stats.prefill_s`` (selfspec methods).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from selfspec.io import atomic_write_text

SCHEMA_VERSION = 1
RESULTS_FIELDS = (
    "schema_version",
    "complete",
    "config",
    "environment",
    "models",
    "memory_kind",
    "summary",
    "by_category",
    "mismatches",
    "records",
    "files",
    "wandb",
)
RECORD_FIELDS = (
    "key",
    "question_id",
    "category",
    "source",
    "turn",
    "method",
    "session",
    "prompt_tokens",
    "new_tokens",
    "tokens",
    "text",
    "wall_s",
    "tokens_per_s",
    "ttft_s",
    "prefill_s",
    "peak_mem_bytes",
    "runs",
    "steps",
    "tau",
    "accepted_hist",
    "accepted_by_depth",
    "same_across_repeats",
    "exact_match",
    "mismatch",
)
AGGREGATE_FIELDS = (
    "requests",
    "new_tokens",
    "wall_s",
    "tokens_per_s",
    "speedup_vs_hf",
    "speedup_vs_engine",
    "tau",
    "steps",
    "accepted_hist",
    "accepted_by_depth",
    "latency_p50_s",
    "latency_p95_s",
    "ttft_p50_s",
    "ttft_p95_s",
    "prefill_p50_s",
    "peak_mem_bytes",
    "exact_match_rate",
    "mismatches",
    "near_ties",
)
STATE = "state.json"
RECORDS = "records.jsonl"
RESULTS = "results.json"
REPORT = "report.md"


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")  # strict JSON: no NaN


class RecordLog:
    """``records.jsonl``: finished questions, one line each."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / RECORDS

    def read(self) -> dict[str, dict[str, Any]]:
        """key -> line of every finished question (a torn or garbled line is skipped)."""
        done: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return done
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and "key" in row and isinstance(row.get("records"), list):
                    done[row["key"]] = row
        return done

    def append(self, key: str, session: int, records: list[dict[str, Any]]) -> None:
        line = json.dumps({"key": key, "session": session, "records": records}, allow_nan=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def has_results(out_dir: Path) -> bool:
    return (out_dir / STATE).exists() or (out_dir / RECORDS).exists()


def read_state(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / STATE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}); remove it or choose another --out") from e


def fingerprint_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable 'name: old -> new' for every setting that changed."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def start_session(out_dir: Path, fingerprint: dict[str, Any], env: dict[str, Any]) -> int:
    """Record this invocation in state.json; returns its session index."""
    state = read_state(out_dir) or {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fingerprint,
        "sessions": [],
    }
    state["sessions"].append(env)
    atomic_write_json(out_dir / STATE, state)
    return len(state["sessions"]) - 1


def flatten(lines: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record for line in lines for record in line["records"]]
