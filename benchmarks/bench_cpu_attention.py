"""The CPU tree attention kernel (``kernels/cpu/tree_attention_bf16.c``) against the same kernel
at an earlier commit, in one process, calls interleaved: microseconds per call (one layer of the
default model's shape: 9 query heads over 3 K/V heads, head size 64, bf16) for T tree nodes (a
chain) over P cached keys, and whether both give bitwise the same output.

    python benchmarks/bench_cpu_attention.py --baseline-commit a7b468c --out results/x.json

Both sources are compiled here with the flags ``selfspec.kernels.cpu_build`` uses. Needs a git
checkout (for the baseline), an AVX-512 CPU and a C compiler.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "kernels/cpu/tree_attention_bf16.c"


def build(source_text: str, name: str) -> ctypes.CDLL:
    from selfspec.kernels import cpu_build

    directory = Path(tempfile.mkdtemp())
    src, lib = directory / f"{name}.c", directory / f"{name}.so"
    src.write_text(source_text)
    subprocess.run(["cc", *cpu_build.FLAGS, "-o", str(lib), str(src), "-lm"], check=True)
    dll = ctypes.CDLL(str(lib))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    dll.tree_attention.argtypes = [ptr, ptr, ptr] + [i64] * 3 + [ptr, ptr] + [i64] * 5 + [ctypes.c_float, ptr]
    return dll


def case(prefix: int, t: int, g: torch.Generator):
    k = torch.randn(3, prefix + t, 64, generator=g).bfloat16()
    v = torch.randn(3, prefix + t, 64, generator=g).bfloat16()
    q = torch.randn(t, 9, 64, generator=g).bfloat16()
    rows = torch.tensor([[prefix + j for j in range(i + 1)] + [prefix + i] * (t - i - 1) for i in range(t)])
    return q, k, v, rows, torch.arange(1, t + 1)


def call(dll, q, k, v, prefix, rows, widths, out) -> float:
    start = time.perf_counter()
    dll.tree_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), prefix, rows.data_ptr(),
        widths.data_ptr(), rows.shape[1], q.shape[0], 9, 3, 64, 0.125, out.data_ptr(),
    )  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-commit", required=True, help="commit holding the earlier kernel source")
    ap.add_argument("--prefixes", default="300,1200,3000", help="cached keys P (comma-separated)")
    ap.add_argument("--nodes", default="1,4,12,32", help="tree nodes T (comma-separated)")
    ap.add_argument("--repeats", type=int, default=200, help="timed calls per kernel and shape")
    ap.add_argument("--out", default=None, help="write the results here (json)")
    args = ap.parse_args()
    from selfspec.eval.measure import environment

    old_text = subprocess.run(
        ["git", "show", f"{args.baseline_commit}:{SOURCE}"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    kernels = {
        "baseline": build(old_text, "baseline"),
        "current": build((ROOT / SOURCE).read_text(), "current"),
    }
    g = torch.Generator().manual_seed(0)
    rows_out = []
    for prefix in map(int, args.prefixes.split(",")):
        for t in map(int, args.nodes.split(",")):
            q, k, v, rows, widths = case(prefix, t, g)
            outs = {name: torch.empty(t, 9, 64, dtype=torch.bfloat16) for name in kernels}
            times = {name: [] for name in kernels}
            for r in range(args.repeats):
                for name in list(kernels)[:: 1 if r % 2 == 0 else -1]:
                    times[name].append(call(kernels[name], q, k, v, prefix, rows, widths, outs[name]))
            med = {name: statistics.median(ts) * 1e6 for name, ts in times.items()}
            spread = {
                name: [round(x * 1e6, 1) for x in statistics.quantiles(ts, n=10)[::8]]
                for name, ts in times.items()
            }
            row = {
                "prefix": prefix,
                "nodes": t,
                "us_median": {n: round(m, 1) for n, m in med.items()},
                "us_p10_p90": spread,
                "speedup": round(med["baseline"] / med["current"], 2),
                "bitwise_equal": torch.equal(outs["baseline"], outs["current"]),
            }
            rows_out.append(row)
            print(
                f"P={prefix:5d} T={t:3d}: baseline {med['baseline']:8.1f} us, current {med['current']:8.1f} us, "
                f"{row['speedup']:.2f}x, bitwise equal: {row['bitwise_equal']}",
                flush=True,
            )
    record = {
        "environment": environment(torch.device("cpu"), torch.bfloat16),
        "baseline_commit": args.baseline_commit,
        "shape": "9 query heads / 3 K/V heads, head size 64, bf16, one thread (one layer of the default model)",
        "results": rows_out,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
