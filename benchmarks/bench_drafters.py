"""Several drafters side by side in one process: speed against HF ``generate``, tau, exactness.

Greedy decoding of the default model (bf16 by default, exact verification): for every prompt,
HF ``generate`` and then each (drafter, tree) cell run back to back, so every cell shares the
machine's drift, and each cell's speed is reported as a ratio to HF on the same prompts. Prompts
are *development* prompts by default: rows of the training files that none of the compared
training runs used (``--exclude-per-source``: the seed-0 samples of that many rows per file those
runs drew), never the eval sets; ``--questions FILE`` measures on an MT-bench-format file instead.

    python benchmarks/bench_drafters.py default /work/runs/a /work/runs/b --trees static,dynamic \
        --prompts 2 --out benchmarks/results/drafters_cpu.json
    python benchmarks/bench_drafters.py --smoke   # tiny random model and drafters (run by the tests)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_candidates import SOURCES, TRAIN  # sibling scripts (benchmarks/ is sys.path[0])
from bench_cpu import run_header

import selfspec
from selfspec.eval.methods import HFMethod, SelfspecMethod
from selfspec.sampling import SamplingConfig


def dev_prompts(tokenizer, per_source: int, exclude: list[int]) -> list[torch.Tensor]:
    """Chat-formatted prompts from rows that no seed-0 sample of ``exclude`` rows per file holds."""
    from selfspec.training.config import DataConfig
    from selfspec.training.data import load_examples
    from selfspec.training.distillation import prompt_ids

    out = []
    for name in SOURCES:
        source = str(TRAIN / name)
        used = set()
        for n in exclude:
            sample, _ = load_examples(source, DataConfig(sources=[source], max_per_source=n))
            used |= {e.id for e in sample}
        every, _ = load_examples(source, DataConfig(sources=[source], max_per_source=0))
        rest = [e for e in every if e.id not in used]
        for e in random.Random(1).sample(rest, min(per_source, len(rest))):
            out.append(torch.tensor([prompt_ids(tokenizer, e)]))
    return out


def question_prompts(tokenizer, path: Path, per_category: int) -> list[torch.Tensor]:
    from selfspec.eval.questions import conversation, encode_conversation, load_questions

    qs = load_questions([str(path)], None, per_category)
    return [encode_conversation(tokenizer, conversation(q, []), True) for q in qs]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("drafters", nargs="*", help="'default' or drafter directories")
    ap.add_argument("--trees", default="static,dynamic", help="comma-separated tree arguments")
    ap.add_argument("--prompts", type=int, default=2, help="development prompts per training file")
    ap.add_argument(
        "--exclude-per-source",
        default="200,600,700",
        help="rows per file that the compared runs sampled (seed 0), left out (default: %(default)s)",
    )
    ap.add_argument("--questions", type=Path, help="an MT-bench-format file instead of development prompts")
    ap.add_argument("--per-category", type=int, default=1, help="with --questions: questions per category")
    ap.add_argument("--new-tokens", type=int, default=128, help="new tokens per generation")
    ap.add_argument("--dtype", default="bfloat16", help="target dtype (default: %(default)s)")
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model and drafters, for the tests")
    args = ap.parse_args(argv)
    if args.smoke:
        from transformers import LlamaConfig, LlamaForCausalLM

        from selfspec.models import TINY_SIZES

        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**TINY_SIZES, vocab_size=300)).eval()
        drafters = {kind: selfspec.new_drafter(kind, model) for kind in ("eagle3", "block")}
        prompts, pad = [torch.tensor([[1, 2, 3, 4]]), torch.tensor([[5, 6, 7]])], 0
        args.new_tokens = 8
    else:
        if not args.drafters:
            ap.error("name at least one drafter ('default' or a directory)")
        model, tok = selfspec.load_target("default", dtype=getattr(torch, args.dtype))
        drafters = {d: selfspec.load_drafter(d, model) for d in args.drafters}
        exclude = [int(n) for n in args.exclude_per_source.split(",") if n]
        prompts = (
            question_prompts(tok, args.questions, args.per_category)
            if args.questions
            else dev_prompts(tok, args.prompts, exclude)
        )
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    trees = [int(t) if t.isdigit() else t for t in args.trees.split(",")]
    greedy = SamplingConfig()
    methods = {"hf": HFMethod("hf", model, pad)}
    for name, drafter in drafters.items():
        for tree in trees:
            methods[f"{name} tree={tree}"] = SelfspecMethod(f"{name}|{tree}", model, drafter, tree=tree)
    runs: dict[str, list[dict]] = {name: [] for name in methods}
    with torch.inference_mode():
        for name, m in methods.items():  # warm-up (tree='auto' timing tables, first-call costs)
            m.generate(prompts[0], 4, greedy, None)
        for i, ids in enumerate(prompts):
            reference = None
            for name, m in methods.items():  # interleaved: every cell sees the same drift
                start = time.perf_counter()
                out = m.generate(ids, args.new_tokens, greedy, None)
                wall = time.perf_counter() - start
                reference = out["tokens"] if name == "hf" else reference
                runs[name].append(
                    {
                        "prompt": i,
                        "tokens": len(out["tokens"]),
                        "steps": out.get("steps", len(out["tokens"])),
                        "wall_s": wall,
                        "identical": out["tokens"] == reference,
                    }
                )
            print(f"prompt {i + 1}/{len(prompts)} done", file=sys.stderr, flush=True)
    hf_rate = sum(r["tokens"] for r in runs["hf"]) / sum(r["wall_s"] for r in runs["hf"])
    summary = {}
    for name, rs in runs.items():
        per_prompt = [
            (r["tokens"] / r["wall_s"]) / (h["tokens"] / h["wall_s"]) for r, h in zip(rs, runs["hf"])
        ]
        rate = sum(r["tokens"] for r in rs) / sum(r["wall_s"] for r in rs)
        summary[name] = {
            "tok_per_s": rate,
            "vs_hf": rate / hf_rate,
            "vs_hf_median": statistics.median(per_prompt),
            "vs_hf_min": min(per_prompt),
            "vs_hf_max": max(per_prompt),
            "tau": sum(r["tokens"] for r in rs) / max(sum(r["steps"] for r in rs), 1),
            "identical": sum(r["identical"] for r in rs),
            "prompts": len(rs),
        }
    print(f"{'cell':60s} {'tok/s':>7s} {'vs hf':>6s} {'median':>7s} {'range':>11s} {'tau':>5s} identical")
    for name, s in summary.items():
        print(
            f"{name[-60:]:60s} {s['tok_per_s']:7.1f} {s['vs_hf']:6.2f} {s['vs_hf_median']:7.2f} "
            f"{s['vs_hf_min']:5.2f}-{s['vs_hf_max']:<5.2f} {s['tau']:5.2f} {s['identical']}/{s['prompts']}"
        )
    if args.out:
        record = {
            **run_header(argv),
            "dtype": "float32" if args.smoke else args.dtype,
            "prompts": len(prompts),
            "question_file": str(args.questions) if args.questions else None,
            "new_tokens": args.new_tokens,
            "summary": summary,
            "runs": runs,
        }
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
