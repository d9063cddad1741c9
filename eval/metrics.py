"""Aggregates over eval records: per method, and per method within each category.

Pure functions over the record dicts described in ``selfspec.eval.results``; no models, no I/O.
Throughput is total new tokens over total wall time (long answers weigh more, as in Spec-Bench);
latency and TTFT percentiles are over requests (one request = one question turn).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

DRAFTING = (
    "pld",
    "assisted",
    "selfspec",
    "lookup",
    "selfspec+lookup",
    "vllm+drafter",
)  # methods whose forwards can produce more than one token


def median(values: Iterable[float]) -> float | None:
    return percentile(values, 50)


def percentile(values: Iterable[float | None], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def add_hist(total: list[int], hist: list[int]) -> list[int]:
    out = total + [0] * max(0, len(hist) - len(total))
    for k, n in enumerate(hist):
        out[k] += n
    return out


def by_depth(hist: list[int], max_depth: int) -> list[float]:
    """Share of forwards that kept a drafted token at depth 1..max_depth: a forward producing k
    tokens kept depths 1..k-1 (the last one is the target's own bonus token)."""
    steps = sum(hist)
    return [sum(hist[d + 1 :]) / steps if steps else 0.0 for d in range(1, max_depth + 1)]


def aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's records (any number of questions/turns) -> an Aggregate dict."""
    new_tokens = sum(r["new_tokens"] for r in records)
    wall = sum(r["wall_s"] for r in records)
    hist: list[int] = []
    for r in records:
        hist = add_hist(hist, r["accepted_hist"])
    steps = sum(hist)
    produced = sum(k * n for k, n in enumerate(hist))
    depth: list[float] | None = None
    if records and records[0]["method"] in DRAFTING:
        declared = max((len(r["accepted_by_depth"] or []) for r in records), default=0)
        depth = by_depth(hist, declared or max(len(hist) - 2, 0))
    judged = [r for r in records if r.get("exact_match") is not None]
    mismatched = [r for r in judged if not r["exact_match"]]
    return {
        "requests": len(records),
        "new_tokens": new_tokens,
        "wall_s": wall,
        "tokens_per_s": new_tokens / wall if wall > 0 else None,
        "speedup_vs_hf": None,
        "speedup_vs_engine": None,
        "tau": produced / steps if steps else None,
        "steps": steps,
        "accepted_hist": hist,
        "accepted_by_depth": depth,
        "latency_p50_s": percentile((r["wall_s"] for r in records), 50),
        "latency_p95_s": percentile((r["wall_s"] for r in records), 95),
        "ttft_p50_s": percentile((r["ttft_s"] for r in records), 50),
        "ttft_p95_s": percentile((r["ttft_s"] for r in records), 95),
        "prefill_p50_s": percentile((r["prefill_s"] for r in records), 50),
        "peak_mem_bytes": max((r["peak_mem_bytes"] or 0 for r in records), default=None),
        "exact_match_rate": (len(judged) - len(mismatched)) / len(judged) if judged else None,
        "mismatches": len(mismatched),
        "near_ties": sum(1 for r in mismatched if (r.get("mismatch") or {}).get("verdict") == "near-tie"),
    }


def _with_speedups(group: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    for base in ("hf", "engine"):
        ref = (group.get(base) or {}).get("tokens_per_s")
        for agg in group.values():
            if ref and agg["tokens_per_s"] is not None:
                agg[f"speedup_vs_{base}"] = agg["tokens_per_s"] / ref
    return group


def summarize(records: list[dict[str, Any]], methods: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary {method: Aggregate}, by_category {category: {method: Aggregate}})."""
    summary = _with_speedups({m: aggregate([r for r in records if r["method"] == m]) for m in methods})
    categories = sorted({r["category"] for r in records})
    by_category = {
        c: _with_speedups(
            {m: aggregate([r for r in records if r["method"] == m and r["category"] == c]) for m in methods}
        )
        for c in categories
    }
    return summary, by_category


def mismatch_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per record whose greedy output differs from hf, with the diagnosis."""
    rows = []
    for r in records:
        if r.get("exact_match") is False:
            rows.append(
                {
                    "key": r["key"],
                    "category": r["category"],
                    "turn": r["turn"],
                    "method": r["method"],
                    **(r.get("mismatch") or {}),
                }
            )
    return rows
