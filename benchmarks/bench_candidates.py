"""Top-k vs sampled draft candidates at temperature > 0: tokens per verify step (tau) and speed.

Both kinds of candidates are lossless; they differ in how many drafted tokens the target keeps.
This runs the default model with a drafter on *development* prompts: rows of the training files
(../shared/data/train) that the shipped drafter did not train on (it used a seed-0 sample of 200
rows per file), never the eval sets. Every (temperature, tree, candidates) cell decodes the same
prompts with the same seeds, interleaved, so the cells share the machine's drift.

    python benchmarks/bench_candidates.py --temperatures 0.7,1.0 --trees static,dynamic \
        --prompts 8 --seeds 2 --out benchmarks/results/candidates_cpu.json
    python benchmarks/bench_candidates.py --smoke   # tiny random model, seconds (run by the tests)
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
from pathlib import Path

import torch
from bench_cpu import run_header  # a sibling script (benchmarks/ is sys.path[0])

import selfspec

TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "train"
SOURCES = (
    "gpteacher_roleplay.json",
    "fastchat_dummy_conversation.json",
    "gsm8k_train.jsonl",
    "gpteacher_codegen.json",
)
SHIPPED_PER_SOURCE = 200  # the shipped drafter's --max-per-source (benchmarks/train_default.md), seed 0


def dev_prompts(tokenizer, per_source: int) -> list[torch.Tensor]:
    """Chat-formatted prompts from rows the shipped drafter's training sample left out."""
    from selfspec.training.config import DataConfig
    from selfspec.training.data import load_examples
    from selfspec.training.distillation import prompt_ids

    out = []
    for name in SOURCES:
        source = str(TRAIN / name)
        trained, _ = load_examples(source, DataConfig(sources=[source], max_per_source=SHIPPED_PER_SOURCE))
        every, _ = load_examples(source, DataConfig(sources=[source], max_per_source=0))
        used = {e.id for e in trained}
        rest = [e for e in every if e.id not in used]
        for e in random.Random(1).sample(rest, min(per_source, len(rest))):
            out.append(torch.tensor([prompt_ids(tokenizer, e)]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", default="default", help="'default' or a drafter directory")
    ap.add_argument("--temperatures", default="0.7,1.0", help="comma-separated (default: %(default)s)")
    ap.add_argument("--trees", default="static,dynamic", help="comma-separated tree arguments")
    ap.add_argument("--prompts", type=int, default=2, help="development prompts per training file")
    ap.add_argument("--seeds", type=int, default=2, help="sampling seeds per prompt")
    ap.add_argument("--new-tokens", type=int, default=64, help="new tokens per generation")
    ap.add_argument("--dtype", default="bfloat16", help="target dtype (default: %(default)s)")
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model and drafter, for the tests")
    args = ap.parse_args(argv)
    torch.set_num_threads(1 if args.smoke else torch.get_num_threads())
    if args.smoke:
        from transformers import LlamaConfig, LlamaForCausalLM

        from selfspec.models import TINY_SIZES

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**TINY_SIZES, vocab_size=300)).eval()
        drafter = selfspec.new_drafter("eagle", model)
        prompts = [torch.tensor([[1, 2, 3, 4]]), torch.tensor([[5, 6, 7]])]
        args.new_tokens = 8
    else:
        model, tok = selfspec.load_target("default", dtype=getattr(torch, args.dtype))
        drafter = selfspec.load_drafter(args.drafter, model)
        prompts = dev_prompts(tok, args.prompts)
    temps = [float(t) for t in args.temperatures.split(",")]
    trees = [int(t) if t.isdigit() else t for t in args.trees.split(",")]
    cells = list(itertools.product(temps, trees, ("top-k", "sampled")))
    runs: dict[str, list[dict]] = {f"T={t} tree={tr} {c}": [] for t, tr, c in cells}
    for i, ids in enumerate(prompts):
        for seed in range(args.seeds):
            for t, tr, c in cells:  # interleaved: every cell sees the same drift
                r = selfspec.generate(
                    model,
                    ids,
                    drafter=drafter,
                    max_new_tokens=args.new_tokens,
                    tree=tr,
                    temperature=t,
                    seed=seed,
                    candidates=c,
                )
                s = r.stats
                runs[f"T={t} tree={tr} {c}"].append(
                    {"prompt": i, "seed": seed, "tokens": s.new_tokens, "steps": s.steps, "wall_s": s.wall_s}
                )
        print(f"prompt {i + 1}/{len(prompts)} done", file=sys.stderr, flush=True)
    summary = {}
    for key, rs in runs.items():
        taus = [r["tokens"] / max(r["steps"], 1) for r in rs]
        summary[key] = {
            "tau": sum(r["tokens"] for r in rs) / max(sum(r["steps"] for r in rs), 1),
            "tau_median": statistics.median(taus),
            "tau_min": min(taus),
            "tau_max": max(taus),
            "tok_per_s": sum(r["tokens"] for r in rs) / sum(r["wall_s"] for r in rs),
        }
    print(f"{'cell':40s} {'tau':>6s} {'median':>7s} {'range':>12s} {'tok/s':>7s}")
    for key, s in summary.items():
        print(
            f"{key:40s} {s['tau']:6.2f} {s['tau_median']:7.2f} {s['tau_min']:5.2f}-{s['tau_max']:<5.2f} {s['tok_per_s']:7.1f}"
        )
    for t, tr in itertools.product(temps, trees):
        a, b = summary[f"T={t} tree={tr} sampled"], summary[f"T={t} tree={tr} top-k"]
        print(
            f"T={t} tree={tr}: sampled/top-k tau {a['tau'] / b['tau']:.2f}x, speed {a['tok_per_s'] / b['tok_per_s']:.2f}x"
        )
    if args.out:
        record = {
            **run_header(argv),
            "drafter": args.drafter,
            "dtype": args.dtype,
            "prompts": len(prompts),
            "seeds": args.seeds,
            "new_tokens": args.new_tokens,
            "summary": summary,
            "runs": runs,
        }
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
