"""Engine overhead and verify cost on the default model (issue 2's benchmark).

Part 1, decode speed: HF ``generate`` (greedy), the engine with ``drafter=None``, and the engine
with untrained drafters (shipped default drafter too, when present), on the same prompts, order
rotated every repeat to cancel drift; tokens/s medians and spread, ratios to HF.
Part 2, verify cost: time of one target forward over a T-node tree (T = 1 is a plain decode
step) at a fixed prefix length, median over repeats; ratio to T = 1.

    python benchmarks/bench_engine.py [--prompts 5] [--new-tokens 128] [--repeats 3] [--threads 2]

Writes benchmarks/results/engine_<device>.json and prints a markdown table.
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
from selfspec.hf import StoreCache, TreeMask, attention_backend, new_store, selfspec_attention, target_forward
from selfspec.models import SHIPPED_DRAFTERS
from selfspec.tree import prior_acceptance, tree_from_acceptance

PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how a refrigerator works to a ten-year-old.",
    "What are the main differences between Python lists and tuples?",
    "Give me a recipe for a simple tomato soup.",
    "Summarize the causes of the French Revolution.",
    "Describe the water cycle step by step.",
    "Write a polite email declining a meeting invitation.",
    "What is the Pythagorean theorem? Give an example.",
]


def encode(tokenizer, prompt):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]


def time_hf(model, ids, n):
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start), out, None


def time_engine(drafter):
    def run(model, ids, n):
        res = selfspec.generate(model, ids, drafter=drafter, max_new_tokens=n)
        return res.stats.tokens_per_s, res.sequences, res.stats.mean_accepted_length

    return run


def decode_speed(model, tokenizer, methods, args):
    rows = {name: {"tps": [], "tau": [], "identical": 0, "runs": 0} for name in methods}
    names = list(methods)
    for p_idx, prompt in enumerate(PROMPTS[: args.prompts]):
        ids = encode(tokenizer, prompt)
        for rep in range(args.repeats):
            shift = (p_idx + rep) % len(names)
            order = names[shift:] + names[:shift]  # rotate so no method always runs first
            ref = None
            outputs = {}
            for name in order:
                tps, seq, tau = methods[name](model, ids, args.new_tokens)
                outputs[name] = seq
                rows[name]["tps"].append(tps)
                if tau is not None:
                    rows[name]["tau"].append(tau)
            ref = outputs["hf"]
            for name in names:
                rows[name]["runs"] += 1
                rows[name]["identical"] += int(torch.equal(outputs[name], ref))
        print(f"prompt {p_idx + 1}/{args.prompts} done", file=sys.stderr)
    return rows


def summarize(rows):
    hf = statistics.median(rows["hf"]["tps"])
    out = {}
    for name, r in rows.items():
        med = statistics.median(r["tps"])
        out[name] = {
            "tokens_per_s_median": med,
            "tokens_per_s_min": min(r["tps"]),
            "tokens_per_s_max": max(r["tps"]),
            "tokens_per_s_stdev": statistics.pstdev(r["tps"]),
            "ratio_to_hf": med / hf,
            "tau_mean": statistics.mean(r["tau"]) if r["tau"] else None,
            "identical_to_hf": f"{r['identical']}/{r['runs']}",
        }
    return out


@torch.inference_mode()
def verify_cost(model, sizes, prefix_len, repeats):
    """Median seconds of one target forward over a T-node tree after ``prefix_len`` cached tokens."""
    backend = attention_backend(model.device)
    prior = prior_acceptance(8, 8, first=0.7, decay=0.85)
    prompt = torch.randint(100, 20000, (prefix_len,), generator=torch.Generator().manual_seed(0))
    result = {}
    with selfspec_attention(model):
        cache = StoreCache(new_store(model, prefix_len + max(sizes) + 1))
        target_forward(model, cache, prompt)
        cache.store.commit(torch.arange(prefix_len))
        times = {t: [] for t in sizes}
        for _ in range(repeats):
            for t in sizes:  # interleaved across sizes
                tree = tree_from_acceptance(prior, t)
                tokens = torch.randint(100, 20000, (t,))
                mask = TreeMask(tree.ancestor_mask, backend) if t > 1 else None
                start = time.perf_counter()
                target_forward(model, cache, tokens, tree.depths, mask)
                times[t].append(time.perf_counter() - start)
    base = statistics.median(times[1])
    for t in sizes:
        med = statistics.median(times[t])
        result[t] = {
            "median_ms": med * 1e3,
            "min_ms": min(times[t]) * 1e3,
            "max_ms": max(times[t]) * 1e3,
            "ratio_to_one_token": med / base,
        }
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=5, help=f"prompts to decode (max {len(PROMPTS)})")
    ap.add_argument("--new-tokens", type=int, default=128, help="new tokens per prompt")
    ap.add_argument("--repeats", type=int, default=3, help="repeats per prompt (medians over all runs)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (fixed for every method)")
    ap.add_argument("--verify-prefix", type=int, default=256, help="prefix length for the verify-cost part")
    ap.add_argument("--verify-repeats", type=int, default=20, help="repeats per tree size")
    ap.add_argument(
        "--verify-only",
        action="store_true",
        help="skip the decode-speed part (minutes) and time verify cost only",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = selfspec.load_target("default")
    methods = {
        "hf": time_hf,
        "engine": time_engine(None),
        "medusa-untrained": time_engine(selfspec.new_drafter("medusa", model)),
        "eagle-untrained": time_engine(selfspec.new_drafter("eagle", model)),
    }
    if (SHIPPED_DRAFTERS / "default").is_dir():
        methods["default-drafter"] = time_engine(selfspec.load_drafter("default", model))
    warm = encode(tokenizer, "Hello")
    speed = {}
    if not args.verify_only:
        for fn in methods.values():
            fn(model, warm, 8)
        speed = summarize(decode_speed(model, tokenizer, methods, args))
    verify = verify_cost(model, [1, 2, 4, 8, 16, 24, 32, 64], args.verify_prefix, args.verify_repeats)
    record = {
        "benchmark": "engine",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
        "device": str(model.device),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "selfspec": selfspec.__version__,
        "model": "default (SmolLM2-135M-Instruct Q4_1 -> fp32)",
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "decode": speed,
        "verify_prefix": args.verify_prefix,
        "verify": verify,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"engine{'_verify' if args.verify_only else ''}_{model.device.type}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print("| method | tok/s median | min-max | vs HF | tau | identical to HF |\n|---|---|---|---|---|---|")
    for name, r in speed.items():
        tau = f"{r['tau_mean']:.2f}" if r["tau_mean"] else "-"
        print(
            f"| {name} | {r['tokens_per_s_median']:.1f} | {r['tokens_per_s_min']:.1f}-{r['tokens_per_s_max']:.1f} "
            f"| {r['ratio_to_hf']:.3f} | {tau} | {r['identical_to_hf']} |"
        )
    print("\n| tree nodes | verify ms (median) | min-max | vs 1 token |\n|---|---|---|---|")
    for t, r in verify.items():
        print(
            f"| {t} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | {r['ratio_to_one_token']:.2f} |"
        )
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
