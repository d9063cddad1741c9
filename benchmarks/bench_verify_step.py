"""A full verify step over a T-node tree vs a one-token decode step (issue 3's step target).

Random-weight Llama-3-8B-shaped target (32 layers, hidden 4096, 32/8 heads, dim 128, MLP 14336,
vocab 128256), bf16 on CUDA, prefix of 2k tokens already in the cache; times one target forward
over T tree nodes (selfspec's attention backend: the Triton kernels on CUDA) against a one-token
step, CUDA events after warm-up, medians over repeats, interleaved. Both steps read every weight
once, so the physical limit of the ratio is about 1.0 (target: <= 1.15 at T = 64).

    python benchmarks/bench_verify_step.py                   # GPU, the real shape
    python benchmarks/bench_verify_step.py --smoke           # CPU, a tiny shape, no claims

Writes benchmarks/results/verify_step_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from selfspec.hf import StoreCache, TreeMask, attention_backend, new_store, selfspec_attention, target_forward
from selfspec.models import TINY_SIZES
from selfspec.tree import prior_acceptance, tree_from_acceptance

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
)
TINY = {**TINY_SIZES, "vocab_size": 512, "max_position_embeddings": 1024}


def timer(device):
    if device.type == "cuda":

        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
    else:

        def run(fn):
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

    return run


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, to check the script runs")
    ap.add_argument("--prefix", type=int, default=2048, help="tokens already in the cache")
    ap.add_argument("--trees", default="1,16,32,64,128", help="tree sizes to time (1 = decode step)")
    ap.add_argument("--repeats", type=int, default=30, help="timed repeats per size")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    sizes = [int(s) for s in args.trees.split(",")]
    shape = TINY if args.smoke else LLAMA3_8B
    prefix = min(args.prefix, 64) if args.smoke else args.prefix
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype).eval()
    # random, not zero, weights and tokens: zeros make matmuls and softmax unrealistically cheap
    prompt = torch.randint(0, shape["vocab_size"], (prefix,), device=device)
    prior = prior_acceptance(10, 10, first=0.7, decay=0.85)
    backend = attention_backend(device)
    times = {t: [] for t in sizes}
    measure = timer(device)
    with selfspec_attention(model):
        cache = StoreCache(new_store(model, prefix + max(sizes) + 1))
        target_forward(model, cache, prompt)
        cache.store.commit(torch.arange(prefix))
        steps = {}
        for t in sizes:
            tree = tree_from_acceptance(prior, t).to(device)
            tokens = torch.randint(0, shape["vocab_size"], (t,), device=device)
            mask = TreeMask(tree.ancestor_mask, backend) if t > 1 else None
            steps[t] = lambda tokens=tokens, tree=tree, mask=mask: target_forward(
                model, cache, tokens, tree.depths, mask
            )
            for _ in range(3):
                steps[t]()  # warm-up (autotuning, allocator)
        for _ in range(args.repeats):
            for t in sizes:
                times[t].append(measure(steps[t]))
    base = statistics.median(times[1]) if 1 in times else None
    rows = {
        t: {
            "median_ms": statistics.median(v) * 1e3,
            "min_ms": min(v) * 1e3,
            "max_ms": max(v) * 1e3,
            "ratio_to_decode": statistics.median(v) / base if base else None,
        }
        for t, v in times.items()
    }
    record = {
        "benchmark": "verify_step",
        "smoke": args.smoke,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": str(dtype),
        "shape": shape,
        "prefix": prefix,
        "backend": backend,
        "results": rows,
    }
    if not args.smoke:
        args.out.mkdir(parents=True, exist_ok=True)
        name = "cuda" if device.type == "cuda" else "cpu"
        (args.out / f"verify_step_{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    print("| tree nodes | median ms | min-max | vs decode |\n|---|---|---|---|")
    for t, r in rows.items():
        ratio = f"{r['ratio_to_decode']:.3f}" if r["ratio_to_decode"] else "-"
        print(f"| {t} | {r['median_ms']:.2f} | {r['min_ms']:.2f}-{r['max_ms']:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
