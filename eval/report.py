"""``report.md`` and the PNG plots of an eval, both built from the ``results.json`` dict.

Plots (matplotlib, Agg backend, no display needed):
- ``speedup_by_category.png``: throughput speedup of each method over ``hf`` (over ``engine``
  when hf was not run), per category and overall;
- ``accepted_length_hist.png``: share of verify forwards that produced k tokens, per method;
- ``acceptance_by_depth.png``: share of verify forwards that kept a drafted token at depth d.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.ticker import MaxNLocator

from selfspec.eval.results import REPORT
from selfspec.io import atomic_write_text

PLOTS = ("speedup_by_category.png", "accepted_length_hist.png", "acceptance_by_depth.png")


def _fmt(x: Any, digits: int = 2, suffix: str = "") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}{suffix}"
    return f"{x}{suffix}"


def _mib(x: int | None) -> str:
    if not x:
        return "–"
    mib = x / 2**20
    return f"{mib:,.0f}" if mib >= 10 else f"{mib:.2f}"


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{1000 * x:.0f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _summary_table(results: dict[str, Any]) -> list[str]:
    header = [
        "method",
        "tok/s",
        "vs hf",
        "vs engine",
        "tau",
        "TTFT p50 ms",
        "latency p50 s",
        "latency p95 s",
        f"peak mem MiB ({results['memory_kind']})",
        "exact match",
        "requests",
    ]
    rows = []
    for m, a in results["summary"].items():
        rows.append(
            [
                m,
                _fmt(a["tokens_per_s"]),
                _fmt(a["speedup_vs_hf"], suffix="x"),
                _fmt(a["speedup_vs_engine"], suffix="x"),
                _fmt(a["tau"]),
                _ms(a["ttft_p50_s"]),
                _fmt(a["latency_p50_s"]),
                _fmt(a["latency_p95_s"]),
                _mib(a["peak_mem_bytes"]),
                _pct(a["exact_match_rate"]),
                str(a["requests"]),
            ]
        )
    return _table(header, rows)


def _category_table(results: dict[str, Any]) -> list[str]:
    methods = list(results["summary"])
    base = "hf" if "hf" in methods else "engine"
    rows = []
    for cat, group in results["by_category"].items():
        row = [cat]
        for m in methods:
            a = group[m]
            row.append(f"{_fmt(a['tokens_per_s'], 1)} ({_fmt(a[f'speedup_vs_{base}'], suffix='x')})")
        rows.append(row)
    return _table(["category"] + [f"{m} tok/s (vs {base})" for m in methods], rows)


def _acceptance_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for m, a in results["summary"].items():
        if a["steps"] == 0:
            continue
        hist = ", ".join(f"{k}: {n}" for k, n in enumerate(a["accepted_hist"]) if n)
        depth = ", ".join(_pct(x) for x in a["accepted_by_depth"] or [])
        lines.append(
            f"- **{m}**: tau {_fmt(a['tau'])}; tokens per forward {{{hist}}}"
            + (f"; kept at depth 1..{len(a['accepted_by_depth'])}: {depth}" if depth else "")
        )
    return lines


def _mismatch_lines(results: dict[str, Any]) -> list[str]:
    rows = results["mismatches"]
    if not rows:
        return [
            "No greedy output differs from hf."
            if results["config"]["temperature"] == 0 and "hf" in results["summary"]
            else "Not checked (needs greedy decoding and the hf method)."
        ]
    table = [
        [
            r["key"],
            str(r["turn"]),
            r["method"],
            _fmt(r.get("position")),
            _fmt(r.get("ref_token")),
            _fmt(r.get("token")),
            _fmt(r.get("margin"), 5),
            r.get("verdict", "–"),
        ]
        for r in rows
    ]
    note = (
        "A near-tie is a position where the target's top-2 logits are within float noise for the dtype "
        "and the method took the runner-up; 'suspect' is anything else."
    )
    return [note, ""] + _table(
        ["question", "turn", "method", "first diff", "hf token", "token", "top-2 margin", "verdict"], table
    )


def _models_lines(results: dict[str, Any]) -> list[str]:
    m = results["models"]
    lines = [
        f"- target: `{m['target']['name']}` ({m['target']['dtype']}, {_mib(m['target']['param_bytes'])} MiB)"
    ]
    if m.get("drafter"):
        d = m["drafter"]
        lines.append(
            f"- drafter: `{d['name']}` ({d['kind']}, {_mib(d['param_bytes'])} MiB own parameters, "
            f"+{_pct(d['overhead_vs_target'])} of the target)"
        )
    if m.get("assistant"):
        lines.append(f"- assistant: `{m['assistant']['name']}` ({_mib(m['assistant']['param_bytes'])} MiB)")
    return lines


def _env_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for i, e in enumerate(results["environment"]):
        git = e.get("git") or {}
        commit = (git.get("commit") or "?")[:12] + (" (dirty)" if git.get("dirty") else "")
        lines.append(
            f"- session {i}: {e['device']} — {e['gpu'] or e['cpu']}; {e['dtype']}; torch {e['torch']} "
            f"({e['torch_threads']} threads), transformers {e['transformers']}, triton {e['triton']}; "
            f"selfspec {e['selfspec']} @ {commit}; {e['started']}"
        )
        lines.append(f"  - `{e['command']}`")
    return lines


def markdown(results: dict[str, Any]) -> str:
    c = results["config"]
    sampling = (
        "greedy"
        if c["temperature"] == 0
        else f"temperature {c['temperature']}, top-p {c['top_p']}, top-k {c['top_k']}"
    )
    status = "" if results["complete"] else " — **incomplete** (resume with `--resume`)"
    n_questions = len({r["key"] for r in results["records"]})
    setting = (
        f"{n_questions} questions ({', '.join(c['questions'])}), turns: {c['turns']}, {sampling}, "
        f"max {c['max_new_tokens']} new tokens, {c['repeats']} repeat(s) (medians), warm-up {c['warmup']}, "
        f"selfspec tree {c.get('tree', 'static')}, {c.get('acceptance', 'exact')} acceptance, "
        f"{c.get('verify', 'exact')} verification; dtype {results['models']['target']['dtype']} for every method; "
        "methods interleaved, order rotated per question and repeat."
    )
    legend = (
        "tok/s = total new tokens / total wall time; speedups are throughput ratios. TTFT = time to the "
        "first streamed token (same streamer for every method)."
    )
    out = [
        f"# selfspec eval{status}",
        "",
        setting,
        "",
        "## Models",
        *_models_lines(results),
        "",
        "## Summary",
        *_summary_table(results),
        "",
        legend,
        "",
        "## By category",
        *_category_table(results),
        "",
        "## Acceptance",
        *(_acceptance_lines(results) or ["No decode steps recorded."]),
        "",
        "## Exactness against hf",
        *_mismatch_lines(results),
        "",
        "## Plots",
        *[f"![{p}]({p})" for p in results["files"]["plots"]],
        "",
        "## Environment",
        *_env_lines(results),
        "",
    ]
    return "\n".join(out)


def write_report(results: dict[str, Any], out_dir: Path) -> Path:
    path = out_dir / REPORT
    atomic_write_text(path, markdown(results))
    return path


# ---------------------------------------------------------------------------------------- plots
def _save(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)


def _speedup_plot(ax: Any, results: dict[str, Any]) -> None:
    methods = list(results["summary"])
    base = "hf" if "hf" in methods else "engine"
    groups = {**results["by_category"], "overall": results["summary"]}
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        values = [(g.get(m) or {}).get(f"speedup_vs_{base}") or 0.0 for g in groups.values()]
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=m)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(
        [x + width * (len(methods) - 1) / 2 for x in range(len(groups))],
        list(groups),
        rotation=30,
        ha="right",
    )
    ax.set_ylabel(f"speedup over {base} (throughput)")
    ax.legend(fontsize=8)


def _hist_plot(ax: Any, results: dict[str, Any]) -> None:
    shown = {m: a for m, a in results["summary"].items() if sum(a["accepted_hist"])}
    width = 0.8 / max(len(shown), 1)
    for i, (m, a) in enumerate(shown.items()):
        total = sum(a["accepted_hist"])
        ks = range(1, len(a["accepted_hist"]))  # k = 0 never happens: every forward yields a token
        shares = [a["accepted_hist"][k] / total for k in ks]
        ax.bar(
            [k + (i - (len(shown) - 1) / 2) * width for k in ks],
            shares,
            width,
            label=f"{m} (tau {_fmt(a['tau'])})",
        )
    ax.set_xticks(range(1, max((len(a["accepted_hist"]) for a in shown.values()), default=2)))
    ax.set_xlabel("tokens produced per verify forward")
    ax.set_ylabel("share of forwards")
    if shown:
        ax.legend(fontsize=8)


def _depth_plot(ax: Any, results: dict[str, Any]) -> None:
    drawn = False
    for m, a in results["summary"].items():
        if a["accepted_by_depth"]:
            depths = range(1, len(a["accepted_by_depth"]) + 1)
            ax.plot(list(depths), a["accepted_by_depth"], marker="o", label=m)
            drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no drafting method in this eval", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("draft depth")
    ax.set_ylabel("share of verify forwards keeping depth d")
    ax.set_ylim(0, 1)


def write_plots(results: dict[str, Any], out_dir: Path) -> list[str]:
    """Write the three PNGs into out_dir; returns their file names."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    for name, draw, title in zip(
        PLOTS,
        (_speedup_plot, _hist_plot, _depth_plot),
        ("Speedup by category", "Accepted length", "Acceptance by depth"),
    ):
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        draw(ax, results)
        ax.set_title(f"{title} — {results['models']['target']['name']}")
        _save(fig, out_dir / name)
    return list(PLOTS)
