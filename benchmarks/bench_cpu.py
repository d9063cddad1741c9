"""The CPU fast path (issue 11): decode speed and exactness per dtype, verify cost, step breakdown.

Part 1, decode: on MT-bench first turns spread over the categories, greedy, every method on every
prompt in one process, the order rotated per prompt: HF ``generate`` (the reference, in the same
dtype), the engine without a drafter, and selfspec with the shipped drafter (static tree, dynamic
tree, ``tree="auto"``) with exact verification, plus the static tree with batched verification
(the pre-exactness path) for contrast. Per method: total tokens / total time, per-prompt ratio
to HF (median, min, max), tau, and how many outputs are identical to HF's.
Part 2, verify cost: one target forward over a T-node tree after a fixed prefix, per dtype and
verification mode, as a ratio to a one-token step (interleaved, medians).
Part 3, step breakdown: where a step's time goes (draft, verify, accept + commit, the rest)
from ``Stats`` of the decode runs.

    python benchmarks/bench_cpu.py [--dtypes bfloat16 float32] [--per-category 2] [--new-tokens 256]

Writes benchmarks/results/cpu_fast_path.json (``--smoke``: a tiny random model, nothing recorded
unless --out is given) and prints markdown tables.
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
from selfspec.hf import StoreCache, TreeMask, new_store, selfspec_attention, target_forward
from selfspec.models import SHIPPED_DRAFTERS
from selfspec.tree import prior_acceptance, tree_from_acceptance

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from prompts import MT_BENCH, questions  # the prompt set vllm_cpu/run.py shares (stdlib only)

SIZES = (1, 2, 3, 4, 8, 16, 32, 64)


def methods(model, drafter) -> dict:
    def hf(ids, n):
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        return out, time.perf_counter() - start, None

    def engine(tree, verify="exact", use_drafter=True):
        def run(ids, n):
            res = selfspec.generate(
                model,
                ids,
                drafter=drafter if use_drafter else None,
                max_new_tokens=n,
                tree=tree,
                verify=verify,
            )
            return res.sequences, res.stats.wall_s, res.stats

        return run

    out = {"hf": hf, "engine": engine(None, use_drafter=False)}
    if drafter is not None:
        out |= {
            "static": engine("static"),
            "dynamic": engine("dynamic"),
            "auto": engine("auto"),
            "static-batched": engine("static", "batched"),
        }
    return out


def decode(model, tokenizer, drafter, prompts, new_tokens, only=None) -> dict:
    table = {k: v for k, v in methods(model, drafter).items() if not only or k in only or k == "hf"}
    names = list(table)
    rows = {
        n: {
            "tokens": 0,
            "seconds": 0.0,
            "ratios": [],
            "identical": 0,
            "steps": 0,
            "produced": 0,
            "draft_s": 0.0,
            "verify_s": 0.0,
            "accept_s": 0.0,
            "tree_nodes": None,
        }
        for n in names
    }
    warm = encode(tokenizer, "Hello")
    for fn in table.values():  # warm-up (and tree="auto"'s one-off timing, cached)
        fn(warm, 8)
    for i, prompt in enumerate(prompts):
        ids = encode(tokenizer, prompt)
        order = names[i % len(names) :] + names[: i % len(names)]
        runs = {name: table[name](ids, new_tokens) for name in order}
        ref, hf_s = runs["hf"][0], runs["hf"][1]
        hf_tps = (ref.shape[1] - ids.shape[1]) / hf_s
        for name, (seq, seconds, stats) in runs.items():
            r, n = rows[name], seq.shape[1] - ids.shape[1]
            r["tokens"] += n
            r["seconds"] += seconds
            r["ratios"].append(n / seconds / hf_tps)
            r["identical"] += int(torch.equal(seq, ref))
            if stats is not None:
                r["steps"] += stats.steps
                r["produced"] += sum(k * c for k, c in enumerate(stats.accepted_hist))
                r["draft_s"] += stats.draft_s
                r["verify_s"] += stats.verify_s
                r["accept_s"] += stats.accept_s
                r["tree_nodes"] = stats.tree_nodes
        print(f"prompt {i + 1}/{len(prompts)} done", file=sys.stderr, flush=True)
    hf_rate = rows["hf"]["tokens"] / rows["hf"]["seconds"]
    out = {}
    for name, r in rows.items():
        rate = r["tokens"] / r["seconds"]
        out[name] = {
            "tokens_per_s": rate,
            "ratio_to_hf": rate / hf_rate,
            "per_prompt_ratio_median": statistics.median(r["ratios"]),
            "per_prompt_ratio_min": min(r["ratios"]),
            "per_prompt_ratio_max": max(r["ratios"]),
            "identical_to_hf": f"{r['identical']}/{len(prompts)}",
            "tree_nodes": r["tree_nodes"],
        }
        if r["steps"]:
            per_step = 1e3 / r["steps"]  # ms per step per second of total
            out[name] |= {
                "tau": r["produced"] / r["steps"],
                "step_ms": per_step * r["seconds"],
                "draft_ms": per_step * r["draft_s"],
                "verify_ms": per_step * r["verify_s"],
                "accept_commit_ms": per_step * r["accept_s"],
                "other_ms": per_step * (r["seconds"] - r["draft_s"] - r["verify_s"] - r["accept_s"]),
            }
    return out


@torch.inference_mode()
def verify_cost(model, prefix: int, repeats: int, sizes=SIZES) -> dict:
    """Median ms of a verify forward over T nodes (best-first trees of a prior), both modes,
    interleaved; T = 1 is a one-token step."""
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (prefix,), generator=g)
    prior = prior_acceptance(8, 8, first=0.6, decay=0.8)
    times: dict = {(t, mode): [] for t in sizes for mode in ("exact", "batched")}
    with selfspec_attention(model):
        cache = StoreCache(new_store(model, prefix + max(sizes) + 1))
        target_forward(model, cache, ids)
        cache.store.commit(torch.arange(prefix))
        for rep in range(repeats + 1):
            for t, mode in list(times):
                tree = tree_from_acceptance(prior, t)
                tokens = torch.randint(0, vocab, (t,), generator=g)
                start = time.perf_counter()
                mask = TreeMask(tree.ancestor_mask, "torch", mode == "exact") if t > 1 else None
                target_forward(model, cache, tokens, tree.depths, mask)
                if rep:  # the first round warms up
                    times[t, mode].append(time.perf_counter() - start)
    one = statistics.median(times[1, "exact"])
    return {
        mode: {
            t: {
                "median_ms": 1e3 * statistics.median(times[t, mode]),
                "ratio_to_one_token": statistics.median(times[t, mode]) / one,
            }
            for t in sizes
        }
        for mode in ("exact", "batched")
    }


def run_header(argv) -> dict:
    """What every benchmark record starts with: when, the command, the device and versions."""
    import sys
    import time

    args = argv if argv is not None else sys.argv[1:]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.argv[0]).name, *args]),
        "device": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def encode(tokenizer, prompt):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]


def load(dtype: str, smoke: bool):
    if smoke:
        sys.path.insert(0, str(ROOT))  # the tests' tiny-model helpers
        from tests.conftest import make_tiny, make_tokenizer

        tokenizer = make_tokenizer()
        model = make_tiny("llama-wide-mlp", getattr(torch, dtype), vocab=len(tokenizer))
        return model, tokenizer, selfspec.new_drafter("eagle3", model)
    model, tokenizer = selfspec.load_target("default", dtype=dtype)
    drafter = selfspec.load_drafter("default", model) if (SHIPPED_DRAFTERS / "default").is_dir() else None
    return model, tokenizer, drafter


def print_tables(record: dict) -> None:
    for dtype, part in record["dtypes"].items():
        print(
            f"\n### {dtype}: decode (greedy, {record['new_tokens']} new tokens, {record['prompts']} prompts)\n"
        )
        print(
            "| method | tree nodes | tok/s | vs HF | per prompt vs HF (median, min-max) | tau | identical to HF |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, r in part["decode"].items():
            tau = f"{r['tau']:.2f}" if "tau" in r else "-"
            print(
                f"| {name} | {r['tree_nodes'] or '-'} | {r['tokens_per_s']:.1f} | {r['ratio_to_hf']:.2f} | "
                f"{r['per_prompt_ratio_median']:.2f} ({r['per_prompt_ratio_min']:.2f}-"
                f"{r['per_prompt_ratio_max']:.2f}) | {tau} | {r['identical_to_hf']} |"
            )
        print("\n| method | step ms | draft | verify | accept + commit | other |\n|---|---|---|---|---|---|")
        for name, r in part["decode"].items():
            if "step_ms" in r:
                print(
                    f"| {name} | {r['step_ms']:.1f} | {r['draft_ms']:.1f} | {r['verify_ms']:.1f} | "
                    f"{r['accept_commit_ms']:.2f} | {r['other_ms']:.2f} |"
                )
        print(f"\nverify cost, prefix {record['verify_prefix']} (ms, ratio to a one-token step):\n")
        sizes = list(part["verify"]["exact"])
        print("| mode | " + " | ".join(f"T={t}" for t in sizes) + " |\n|---|" + "---|" * len(sizes))
        for mode, row in part["verify"].items():
            print(
                f"| {mode} | "
                + " | ".join(f"{r['median_ms']:.1f} ({r['ratio_to_one_token']:.2f}x)" for r in row.values())
                + " |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--dtypes", nargs="+", default=["bfloat16", "float32"], help="target dtypes, each measured alike"
    )
    ap.add_argument(
        "--per-category", type=int, default=2, help="MT-bench first turns per category (8 categories)"
    )
    ap.add_argument("--new-tokens", type=int, default=256, help="new tokens per prompt")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, the same for every method")
    ap.add_argument("--verify-prefix", type=int, default=256, help="prefix length of the verify-cost part")
    ap.add_argument("--verify-repeats", type=int, default=7, help="repeats per tree size and mode")
    ap.add_argument("--skip-decode", nargs="*", default=[], help="dtypes whose decode part is skipped")
    ap.add_argument(
        "--methods",
        nargs="*",
        default=[],
        help="DTYPE:METHOD,METHOD... limits a dtype's decode methods (hf always runs), e.g. "
        "float32:engine,auto,static-batched (fp32 exact trees compute every linear row by row)",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 2 prompts, 8 tokens (tests)")
    ap.add_argument("--out", type=Path, help="JSON record (default: benchmarks/results/cpu_fast_path.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompts = ["hello there", "the quick brown fox"] if args.smoke else questions(MT_BENCH, args.per_category)
    new_tokens = 8 if args.smoke else args.new_tokens
    record = {
        "benchmark": "cpu_fast_path",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
        "cpu": cpu_name(),
        "threads": args.threads,
        "native_bf16": selfspec.models.cpu_has_native_bf16(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "selfspec": selfspec.__version__,
        "model": "tiny random Llama" if args.smoke else "default (SmolLM2-135M-Instruct)",
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "verify_prefix": args.verify_prefix,
        "dtypes": {},
    }
    for dtype in args.dtypes:
        model, tokenizer, drafter = load(dtype, args.smoke)
        part = {}
        only = [
            m
            for spec in args.methods
            if spec.startswith(dtype + ":")
            for m in spec.split(":", 1)[1].split(",")
        ]
        if dtype not in args.skip_decode:
            part["decode"] = decode(model, tokenizer, drafter, prompts, new_tokens, only)
        prefix = 16 if args.smoke else args.verify_prefix
        record["verify_prefix"] = prefix
        part["verify"] = verify_cost(
            model, prefix, 1 if args.smoke else args.verify_repeats, (1, 2, 4) if args.smoke else SIZES
        )
        record["dtypes"][dtype] = part
    out = args.out or (None if args.smoke else ROOT / "benchmarks" / "results" / "cpu_fast_path.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"written {out}", file=sys.stderr)
    print_tables({**record, "dtypes": {d: p for d, p in record["dtypes"].items() if "decode" in p}})


if __name__ == "__main__":
    main()
