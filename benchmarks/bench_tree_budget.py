"""tree="auto" against every fixed tree budget it considers (issue 6's benchmark).

On the same MT-bench prompts, interleaved (order rotated per prompt and repeat): HF ``generate``,
the engine without drafting, the drafter with its calibrated static tree, dynamic trees of each
fixed budget, and ``tree="auto"`` (whose one-off measurement is timed separately and reported,
with the budget it chose and the expected tokens/s it computed for each candidate). Greedy by
default, so every output is also checked against HF's.

    python benchmarks/bench_tree_budget.py [--per-category 1] [--new-tokens 128] [--threads 1]
    python benchmarks/bench_tree_budget.py --smoke     # tiny random model, seconds (CPU check)

Writes benchmarks/results/tree_budget_<device>.json (or --out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

import selfspec
from selfspec.autotune import auto_tree, cache_key
from selfspec.eval.questions import conversation, encode_conversation, load_questions
from selfspec.models import TINY_SIZES, cache_dir

ROOT = Path(__file__).resolve().parents[1]
MT_BENCH = ROOT.parent / "shared" / "data" / "eval" / "mt_bench.jsonl"


def load(args):
    if args.smoke:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(**TINY_SIZES, vocab_size=300)
        model = LlamaForCausalLM(cfg).eval()
        model.generation_config.eos_token_id = None
        prompts = [
            torch.randint(3, 300, (12,), generator=torch.Generator().manual_seed(i))[None] for i in range(2)
        ]
        return (
            model,
            selfspec.new_drafter("eagle", model),
            [("smoke", f"random:{i}", p) for i, p in enumerate(prompts)],
        )
    model, tokenizer = selfspec.load_target(args.model)
    drafter = selfspec.load_drafter(args.drafter, model)
    qs = load_questions([str(args.questions)], args.limit, args.per_category)
    prompts = [(q.category, q.key, encode_conversation(tokenizer, conversation(q, []), True)) for q in qs]
    return model, drafter, prompts


def run_hf(model, ids, n):
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    wall = time.perf_counter() - start
    return out[0, ids.shape[1] :].tolist(), wall, None, None


def run_selfspec(drafter, tree):
    def run(model, ids, n):
        res = selfspec.generate(model, ids, drafter=drafter, max_new_tokens=n, tree=tree)
        s = res.stats
        return res.sequences[0, ids.shape[1] :].tolist(), s.wall_s, s.mean_accepted_length, s.tree_nodes

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="target model (default: %(default)s)")
    ap.add_argument(
        "--drafter", default="default", help="drafter: 'default' or a directory (default: %(default)s)"
    )
    ap.add_argument(
        "--questions", type=Path, default=MT_BENCH, help="MT-bench-format JSONL (first turns used)"
    )
    ap.add_argument(
        "--per-category", type=int, default=1, help="questions per category (default: %(default)s)"
    )
    ap.add_argument("--limit", type=int, help="first K questions only")
    ap.add_argument(
        "--new-tokens", type=int, default=128, help="new tokens per prompt (default: %(default)s)"
    )
    ap.add_argument(
        "--budgets", default="2,3,4,6,8,16", help="fixed dynamic-tree budgets (default: %(default)s)"
    )
    ap.add_argument(
        "--repeats", type=int, default=1, help="timed runs per method and prompt (default: %(default)s)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--remeasure", action="store_true", help="drop this setup's cached auto choice first")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny random model and drafter: checks the script runs"
    )
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results", help="directory for the JSON"
    )
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    if args.smoke:
        budgets, args.new_tokens = [2, 4], 12
    torch.set_num_threads(args.threads)
    model, drafter, prompts = load(args)

    table_path = cache_dir() / "autotune.json"
    key = cache_key(model, drafter)
    table = json.loads(table_path.read_text()) if table_path.is_file() else {}
    if (args.remeasure or args.smoke) and key in table:
        del table[key]
        table_path.write_text(json.dumps(table, indent=1))
    start = time.perf_counter()
    chosen = auto_tree(model, drafter)
    auto_s = time.perf_counter() - start
    auto_entry = json.loads(table_path.read_text())[key]

    methods = {"hf": run_hf, "engine": run_selfspec(None, None), "static": run_selfspec(drafter, "static")}
    for b in budgets:
        methods[f"N={b}"] = run_selfspec(drafter, b)
    methods["auto"] = run_selfspec(drafter, "auto")
    names = list(methods)
    for fn in methods.values():  # warm-up: every code path once
        fn(model, prompts[0][2], 8)

    rows = {
        n: {
            "tokens": 0,
            "wall_s": 0.0,
            "tau": [],
            "ratio_to_hf": [],
            "identical": 0,
            "runs": 0,
            "nodes": set(),
        }
        for n in names
    }
    for p, (category, key_q, ids) in enumerate(prompts):
        for rep in range(args.repeats):
            shift = (p * args.repeats + rep) % len(names)
            order = names[shift:] + names[:shift]
            outs = {}
            for name in order:
                tokens, wall, tau, nodes = methods[name](model, ids, args.new_tokens)
                outs[name] = (tokens, wall)
                r = rows[name]
                r["tokens"] += len(tokens)
                r["wall_s"] += wall
                r["runs"] += 1
                if tau is not None:
                    r["tau"].append(tau)
                    r["nodes"].add(nodes)
            hf_tokens, hf_wall = outs["hf"]
            for name in names:
                tokens, wall = outs[name]
                rows[name]["identical"] += tokens == hf_tokens
                rows[name]["ratio_to_hf"].append((len(tokens) / wall) / (len(hf_tokens) / hf_wall))
        print(f"[bench] {p + 1}/{len(prompts)} {key_q} ({category})", file=sys.stderr)

    hf_rate = rows["hf"]["tokens"] / rows["hf"]["wall_s"]
    summary = {}
    for name, r in rows.items():
        rate = r["tokens"] / r["wall_s"]
        summary[name] = {
            "tokens_per_s": rate,
            "vs_hf": rate / hf_rate,
            "per_prompt_vs_hf_median": statistics.median(r["ratio_to_hf"]),
            "per_prompt_vs_hf_min": min(r["ratio_to_hf"]),
            "per_prompt_vs_hf_max": max(r["ratio_to_hf"]),
            "tau": statistics.mean(r["tau"]) if r["tau"] else None,
            "tree_nodes": sorted(r["nodes"]),
            "identical_to_hf": f"{r['identical']}/{r['runs']}",
            "new_tokens": r["tokens"],
            "wall_s": r["wall_s"],
        }
    fixed = {n: s for n, s in summary.items() if n.startswith("N=") or n in ("engine", "static")}
    best = max(fixed, key=lambda n: fixed[n]["tokens_per_s"])
    verdict = summary["auto"]["tokens_per_s"] / fixed[best]["tokens_per_s"]
    record = {
        "benchmark": "tree_budget",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "selfspec": selfspec.__version__,
        "model": "tiny random Llama (smoke)" if args.smoke else args.model,
        "drafter": args.drafter,
        "questions": str(args.questions),
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "budgets": budgets,
        "auto": {
            "chosen_nodes": chosen.budget if hasattr(chosen, "budget") else chosen.size,
            "measure_s": auto_s,
            "table": auto_entry,
        },
        "summary": summary,
        "best_fixed": best,
        "auto_vs_best_fixed": verdict,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tree_budget_{'smoke' if args.smoke else model.device.type}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(
        "| method | tree nodes | tok/s | vs HF | per-prompt vs HF median (min-max) | tau | identical to HF |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        tau = f"{s['tau']:.2f}" if s["tau"] else "-"
        nodes = ",".join(map(str, s["tree_nodes"])) or "-"
        print(
            f"| {name} | {nodes} | {s['tokens_per_s']:.2f} | {s['vs_hf']:.2f} | {s['per_prompt_vs_hf_median']:.2f} "
            f"({s['per_prompt_vs_hf_min']:.2f}-{s['per_prompt_vs_hf_max']:.2f}) | {tau} | {s['identical_to_hf']} |"
        )
    print(
        f"\nauto chose {record['auto']['chosen_nodes']} node(s) (measured in {auto_s:.1f} s); best fixed: {best}; "
        f"auto / best fixed = {verdict:.2f}\nwritten {path}"
    )


if __name__ == "__main__":
    main()
