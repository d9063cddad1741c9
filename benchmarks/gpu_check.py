"""Every open GPU check in one command, for the 15-minute GPU lease (issue 15).

Runs the checks that benchmarks/README.md lists under "GPU checks not yet run", each in its own
process with its own time limit, and writes everything to one directory: a summary.json (device,
versions, command, and per check: the command, exit code, seconds, the tail of its output), the
benchmarks' own JSON files and the test runs' JUnit XML. A failing or timed-out check is recorded
and the next one runs (fail soft); the exit code is 0 when every check that ran passed.

    python benchmarks/gpu_check.py OUT_DIR [--gguf PATH] [--only NAME ...]   # on the GPU machine
    python benchmarks/gpu_check.py OUT_DIR --smoke                           # CPU: tiny versions

The GPU machine cannot download: pass the default model's GGUF (carried over as ../shared/GPU.md
says) with --gguf, or the default-model check is recorded as skipped. Budget: the checks' limits
add up to under 8 minutes on an H100/H200; --smoke runs the same list at toy sizes on the CPU
(the test suite runs it), so the script itself is tested before a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct-Q4_1.gguf"  # the file name selfspec.models looks for
# pytest with the project's addopts emptied: the GPU machine may lack pytest-timeout, and the
# checks set their own limits here.
PYTEST = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider", "-m", "not slow"]


@dataclass
class Check:
    name: str
    what: str
    argv: list[str]  # "{out}" is replaced by the output directory
    limit_s: int
    needs_gguf: bool = False
    env: dict[str, str] = field(default_factory=dict)


def checks(smoke: bool) -> list[Check]:
    """The open GPU checks (benchmarks/README.md, "GPU checks not yet run"); ``smoke``: toy sizes on CPU."""
    if smoke:
        return [
            Check(
                "kernel_tests",
                "tests/test_kernels.py (one case)",
                [*PYTEST, "tests/test_kernels.py", "-k", "pack", "--junitxml", "{out}/kernel_tests.xml"],
                300,
            ),
            Check(
                "tree_attention_bench",
                "bench_tree_attention.py --smoke",
                [
                    sys.executable,
                    "benchmarks/bench_tree_attention.py",
                    "--smoke",
                    "--out",
                    "{out}/tree_attention.json",
                ],
                300,
            ),
            Check(
                "verify_step_bench",
                "bench_verify_step.py --smoke",
                [sys.executable, "benchmarks/bench_verify_step.py", "--smoke", "--out", "{out}"],
                300,
            ),
        ]
    return [
        Check(
            "kernel_tests",
            "Triton kernels on CUDA, bf16 cases and the torch.compile custom-op test included",
            [*PYTEST, "tests/test_kernels.py", "--junitxml", "{out}/kernel_tests.xml"],
            120,
        ),
        Check(
            "greedy_equality",
            "default model, bf16 and fp32, greedy selfspec == HF generate on CUDA; "
            "the Triton end-to-end tests",
            [
                *PYTEST,
                "tests/test_default_model.py",
                "tests/test_generate.py",
                "-k",
                "default or triton",
                "--junitxml",
                "{out}/greedy_equality.xml",
            ],
            120,
            needs_gguf=True,
        ),
        Check(
            "architectures",
            "sliding-window, soft-capped and sink layers next to Triton full layers on CUDA",
            [*PYTEST, "tests/test_architectures.py", "--junitxml", "{out}/architectures.xml"],
            90,
        ),
        Check(
            "tree_attention_bench",
            "Triton tree attention vs dense-mask SDPA vs FlexAttention, reduced sweep",
            [
                sys.executable,
                "benchmarks/bench_tree_attention.py",
                "--rep-ms",
                "25",
                "--out",
                "{out}/tree_attention.json",
            ],
            90,
        ),
        Check(
            "verify_step_bench",
            "a T-node verify step vs a one-token step, Llama-3-8B shape, 2k prefix",
            [sys.executable, "benchmarks/bench_verify_step.py", "--repeats", "5", "--out", "{out}"],
            60,
        ),
    ]


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001 -- a missing or broken package is a finding, not a crash
            out[name] = f"unavailable: {type(err).__name__}"
    try:
        import torch

        out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA)"
    except Exception as err:  # noqa: BLE001 -- same: record it, run the checks
        out["device"] = f"unknown: {type(err).__name__}"
    return out


def run_check(check: Check, out: Path, env: dict[str, str]) -> dict:
    """One check in its own process; never raises."""
    argv = [a.replace("{out}", str(out)) for a in check.argv]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            argv,
            cwd=ROOT,
            env={**env, **check.env},
            capture_output=True,
            text=True,
            timeout=check.limit_s,
            check=False,
        )
        rc, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        rc = "timeout"
        text = (
            (err.stdout or b"").decode(errors="replace")
            if isinstance(err.stdout, bytes)
            else (err.stdout or "")
        )
    except OSError as err:
        rc, text = "error", str(err)
    return {
        "name": check.name,
        "what": check.what,
        "command": " ".join(argv),
        "limit_s": check.limit_s,
        "rc": rc,
        "seconds": round(time.perf_counter() - start, 1),
        "output_tail": text[-3000:],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="directory for summary.json and every check's output")
    ap.add_argument(
        "--gguf",
        type=Path,
        help=f"the default model's GGUF ({DEFAULT_GGUF_NAME}), for the checks "
        "that load it (the GPU machine cannot download it)",
    )
    ap.add_argument("--smoke", action="store_true", help="toy versions on the CPU, to test this script")
    ap.add_argument("--only", nargs="*", default=[], help="run only these checks (names as in summary.json)")
    args = ap.parse_args(argv)
    if args.gguf is not None and not args.gguf.is_file():
        ap.error(f"--gguf {args.gguf} is not a file")
    todo = checks(args.smoke)
    unknown = sorted(set(args.only) - {c.name for c in todo})
    if unknown:
        ap.error(f"--only: unknown check(s) {unknown}; known: {[c.name for c in todo]}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    env = dict(os.environ)
    if args.gguf is not None:  # a private model cache holding just the given GGUF
        cache = out / "selfspec_cache"
        (cache / "models").mkdir(parents=True, exist_ok=True)
        link = cache / "models" / DEFAULT_GGUF_NAME
        if not link.exists():
            link.symlink_to(args.gguf.resolve())
        env["SELFSPEC_CACHE"] = str(cache)
    summary = {
        "benchmark": "gpu_check",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "smoke": args.smoke,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        **versions(),
        "checks": [],
    }
    for check in todo:
        if args.only and check.name not in args.only:
            continue
        if check.needs_gguf and args.gguf is None:
            result = {
                **asdict(check),
                "rc": "skipped",
                "reason": "no --gguf given (the GPU machine cannot download)",
            }
        else:
            print(f"gpu_check: {check.name} (limit {check.limit_s} s) ...", file=sys.stderr, flush=True)
            result = run_check(check, out, env)
        print(f"gpu_check: {check.name}: rc={result['rc']}", file=sys.stderr, flush=True)
        summary["checks"].append(result)
        # Written after every check, atomically: a lease that ends mid-run keeps what finished.
        tmp = out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, out / "summary.json")
    ran = [c for c in summary["checks"] if c["rc"] != "skipped"]
    return 0 if all(c["rc"] == 0 for c in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
