"""Tree attention: selfspec's Triton kernel vs torch SDPA (dense bool mask) vs FlexAttention.

One verify step's attention for one layer: T tree tokens over a cached prefix, bf16, for the
default model's attention (9 query heads, 3 KV heads, dim 64) and a Llama-3-8B layer (32/8,
dim 128), T in {16, 64, 128}, prefix in {512, 2k, 8k, 32k}, batch 1 and 8. For each shape it
checks that the three agree with the torch reference, then reports the median time with its
p10-p90 spread, the achieved bandwidth (the K/V/Q/O bytes that must move) against a measured
device-to-device copy, and the speedup of ours over each baseline. Results go to
benchmarks/results/ as JSON with the device, date, versions and the command.

    python benchmarks/bench_tree_attention.py            # full sweep, needs CUDA
    python benchmarks/bench_tree_attention.py --smoke    # one tiny shape; CPU: Triton interpreter

``--smoke`` checks that every method runs and agrees with the reference; it records no timings.
FlexAttention's block mask is built once per shape outside the timed region (an engine would
rebuild it every step as the prefix grows), and the baselines' [B, H, T, D] outputs are returned
as transposed views, never made contiguous (ours writes [B, T, H, D], the layout transformers
wants): both choices favour the baselines.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

MODELS = {"default": (9, 3, 64), "llama3-8b": (32, 8, 128)}  # name -> (Hq, Hkv, head dim)
TREE_SIZES = (16, 64, 128)
PREFIXES = (512, 2048, 8192, 32768)
BATCHES = (1, 8)
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="one tiny shape; on CPU via the Triton interpreter"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    parser.add_argument("--rep-ms", type=int, default=200, help="measuring time per method and shape, ms")
    return parser.parse_args()


def random_tree_mask(t: int, seed: int = 0) -> torch.Tensor:
    """bool [T, T] ancestor mask of a random tree (parents before children, at most 8 back)."""
    gen = torch.Generator().manual_seed(seed)
    parents = [-1] + [int(torch.randint(max(0, i - 8), i, (1,), generator=gen)) for i in range(1, t)]
    mask = torch.eye(t, dtype=torch.bool)
    for i in range(1, t):
        mask[i] |= mask[parents[i]]
    return mask


def make_inputs(batch: int, model: str, t: int, prefix: int, dtype: torch.dtype, device: str) -> dict:
    """Random (never zero) q [B, Hq, T, D] as transformers passes it, K/V cache [B, Hkv, P+T, D]."""
    hq, hkv, d = MODELS[model]
    k, v = torch.randn(2, batch, hkv, prefix + t, d, device=device, dtype=dtype).unbind(0)
    return {
        "q": torch.randn(batch, t, hq, d, device=device, dtype=dtype).transpose(1, 2),
        "k": k,
        "v": v,
        "mask": random_tree_mask(t).to(device),
        "prefix": prefix,
        "scale": d**-0.5,
        "prefix_lens": torch.full((batch,), prefix, dtype=torch.int32, device=device),
    }


def run_ours(x: dict):
    from selfspec.kernels.tree_attention import pack_tree_mask, tree_attention

    bits = pack_tree_mask(x["mask"])
    return lambda: tree_attention(x["q"], x["k"], x["v"], x["prefix_lens"], bits, x["scale"])


def run_sdpa(x: dict):
    t = x["mask"].shape[0]
    dense = torch.cat([x["mask"].new_ones(t, x["prefix"]), x["mask"]], 1)[None, None]  # [1, 1, T, P+T]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    # transpose(1, 2) is a free view: [B, H, T, D] -> our [B, T, H, D], not made contiguous.
    return lambda: sdpa(x["q"], x["k"], x["v"], attn_mask=dense, scale=x["scale"], enable_gqa=True).transpose(
        1, 2
    )


def run_flex(x: dict, compiled: bool = True):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    tree, prefix, t = x["mask"], x["prefix"], x["mask"].shape[0]

    def mask_mod(b, h, q_idx, kv_idx):
        # Clamped lookups: flex may evaluate indices padded up to its block size.
        col = kv_idx - prefix
        in_tree = (col >= 0) & (col < t) & tree[q_idx.clamp(max=t - 1), col.clamp(0, t - 1)]
        return (col < 0) | in_tree

    block_mask = create_block_mask(mask_mod, None, None, t, prefix + t, device=x["q"].device)
    flex = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    kwargs = {"block_mask": block_mask, "scale": x["scale"], "enable_gqa": True}
    return lambda: flex(x["q"], x["k"], x["v"], **kwargs).transpose(1, 2)  # a free view, as for SDPA


METHODS = {"ours": run_ours, "sdpa": run_sdpa, "flex": run_flex}


def reference(x: dict) -> torch.Tensor:
    from selfspec.kernels.tree_attention import pack_tree_mask, tree_attention_reference

    bits = pack_tree_mask(x["mask"])
    return tree_attention_reference(x["q"], x["k"], x["v"], x["prefix_lens"], bits, x["scale"])


def min_bytes(x: dict) -> int:
    """Bytes any implementation must move: K and V of prefix + tree, Q in, O out."""
    return 2 * x["k"].numel() * x["k"].element_size() + 2 * x["q"].numel() * x["q"].element_size()


def time_ms(fn, rep_ms: int) -> dict:
    """Median and p10/p90 of per-call times (CUDA events inside do_bench, after its warm-up)."""
    import triton.testing

    times = sorted(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="all"))
    p10, p90 = (times[min(len(times) - 1, int(f * len(times)))] for f in (0.1, 0.9))
    return {"median_ms": statistics.median(times), "p10_ms": p10, "p90_ms": p90, "n": len(times)}


def copy_bandwidth_gbps(rep_ms: int) -> float:
    """Device-to-device copy of 1 GiB: read + write bytes over the median time."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), rep_ms)["median_ms"]
    return 2 * src.numel() * src.element_size() / ms / 1e6


def measure(build, x: dict, expected: torch.Tensor, rep_ms: int | None, copy_gbps: float) -> dict:
    """Agreement with the reference, then (unless rep_ms is None) timing and bandwidth of one method."""
    try:
        fn = build(x)
        result = {"max_err": (fn().float() - expected).abs().max().item()}
        if rep_ms is not None:
            result |= time_ms(fn, rep_ms)
            result["gbps"] = min_bytes(x) / result["median_ms"] / 1e6
            result["frac_of_copy"] = result["gbps"] / copy_gbps
        return result
    except Exception as err:  # noqa: BLE001 -- a baseline that cannot run a shape is reported, not fatal
        return {"error": f"{type(err).__name__}: {err}"[:500]}


def bench_shape(shape: dict, rep_ms: int, copy_gbps: float) -> dict:
    x = make_inputs(**shape, dtype=torch.bfloat16, device="cuda")
    expected = reference(x).float()
    row = dict(shape)
    for name, build in METHODS.items():
        row[name] = measure(build, x, expected, rep_ms, copy_gbps)
    for name in ("sdpa", "flex"):
        if "median_ms" in row[name] and "median_ms" in row["ours"]:
            row[f"speedup_vs_{name}"] = row[name]["median_ms"] / row["ours"]["median_ms"]
    return row


def sweep(rep_ms: int) -> dict:
    # Compiled flex recompiles per shape; past the default limit it would silently run unfused.
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 4096
    copy_gbps = copy_bandwidth_gbps(rep_ms)
    rows = []
    for model in MODELS:
        for batch in BATCHES:
            for prefix in PREFIXES:
                for t in TREE_SIZES:
                    shape = {"batch": batch, "model": model, "t": t, "prefix": prefix}
                    rows.append(bench_shape(shape, rep_ms, copy_gbps))
                    print_row(rows[-1])
                    torch.cuda.empty_cache()
    return {"copy_gbps": copy_gbps, "dtype": "bfloat16", "rows": rows}


def smoke() -> dict:
    """One tiny shape through every method: agreement only, no timings."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # no bf16 math in the interpreter
    shape = {"batch": 2, "model": "default", "t": 8, "prefix": 21}
    x = make_inputs(**shape, dtype=dtype, device=device)
    expected = reference(x).float()
    methods = {**METHODS, "flex": functools.partial(run_flex, compiled=device == "cuda")}
    row = {**shape, **{name: measure(build, x, expected, None, 0.0) for name, build in methods.items()}}
    print(json.dumps(row, indent=2))
    return {"dtype": str(dtype).removeprefix("torch."), "rows": [row]}


def print_row(row: dict) -> None:
    cells = [f"{row['model']:>9} B={row['batch']} P={row['prefix']:>5} T={row['t']:>3}"]
    for name in METHODS:
        r = row[name]
        cells.append(
            f"{name} {r['median_ms']:.3f} ms {r['gbps']:.0f} GB/s" if "median_ms" in r else f"{name} error"
        )
    cells += [f"x{row[k]:.2f} vs {k.removeprefix('speedup_vs_')}" for k in row if k.startswith("speedup_vs_")]
    print(" | ".join(cells), flush=True)


def environment() -> dict:
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        if not args.smoke:
            sys.exit("the full benchmark needs a CUDA device; use --smoke to exercise it on CPU")
        # Must be set before selfspec.kernels defines its @triton.jit functions.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    report = {**environment(), "smoke": args.smoke, **(smoke() if args.smoke else sweep(args.rep_ms))}
    stamp = report["date"].replace(":", "").replace("-", "")[:15]
    kind = "smoke_" if args.smoke else ""
    out = args.out or RESULTS / f"tree_attention_{kind}{report['device'].replace(' ', '_')}_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
