"""Mean accepted length (tau) of one or more drafters on MT-bench-format first turns.

Greedy by default: deterministic, so tau needs one run per drafter, tree and question. With
``--temperature`` > 0 every question is decoded with ``--seeds`` seeds (0, 1, ...), the same for
every drafter and tree. Timings are not taken (use ``selfspec eval`` or ``bench_tree_budget.py``
for speed). tau here is new tokens per verify step.

    python benchmarks/tau_mtbench.py --trees static,dynamic --per-category 1 default DRAFTER_DIR ...
    python benchmarks/tau_mtbench.py --questions ../shared/data/eval/gsm8k.jsonl --per-category 8 default
    python benchmarks/tau_mtbench.py --temperature 1.0 --candidates sampled --seeds 2 default
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import selfspec
from selfspec.eval.questions import conversation, encode_conversation, load_questions

MT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval" / "mt_bench.jsonl"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("drafters", nargs="+", help="'default' or drafter directories")
    ap.add_argument(
        "--trees", default="static,dynamic", help="comma-separated tree arguments (default: %(default)s)"
    )
    ap.add_argument("--questions", type=Path, default=MT_BENCH, help="MT-bench-format JSONL")
    ap.add_argument(
        "--per-category", type=int, default=1, help="questions per category (default: %(default)s)"
    )
    ap.add_argument(
        "--new-tokens", type=int, default=128, help="new tokens per question (default: %(default)s)"
    )
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    ap.add_argument(
        "--candidates",
        default="auto",
        choices=["auto", "top-k", "sampled"],
        help="see selfspec generate --help",
    )
    ap.add_argument(
        "--seeds", type=int, default=1, help="seeds per question when sampling (default: %(default)s)"
    )
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    args = ap.parse_args()
    seeds = range(args.seeds) if args.temperature > 0 else [None]
    torch.set_num_threads(1)
    model, tok = selfspec.load_target("default")
    qs = load_questions([str(args.questions)], None, args.per_category)
    prompts = [encode_conversation(tok, conversation(q, []), True) for q in qs]
    results = {}
    for path in args.drafters:
        drafter = selfspec.load_drafter(path, model)
        for tree in args.trees.split(","):
            arg = int(tree) if tree.isdigit() else tree
            taus = []
            for ids in prompts:
                for seed in seeds:
                    r = selfspec.generate(
                        model,
                        ids,
                        drafter=drafter,
                        max_new_tokens=args.new_tokens,
                        tree=arg,
                        temperature=args.temperature,
                        seed=seed,
                        candidates=args.candidates,
                    )
                    taus.append(r.stats.new_tokens / max(r.stats.steps, 1))
            results[f"{path}|{tree}"] = {"mean": statistics.mean(taus), "per_question": taus}
            print(
                f"{path} tree={tree}: tau {statistics.mean(taus):.3f} {[round(t, 2) for t in taus]}",
                flush=True,
            )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "questions": [q.key for q in qs],
                    "question_file": str(args.questions),
                    "new_tokens": args.new_tokens,
                    "temperature": args.temperature,
                    "candidates": args.candidates,
                    "seeds": args.seeds,
                    "results": results,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
