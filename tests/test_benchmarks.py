"""The benchmark scripts' smoke modes run (tiny shapes, CPU) and write their JSON records, so the
scripts that produce the recorded figures do not rot between GPU sessions."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, env=None):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_tree_budget_smoke(tmp_path):
    run("bench_tree_budget.py", "--out", str(tmp_path), env={"SELFSPEC_CACHE": str(tmp_path / "cache")})
    record = json.loads((tmp_path / "tree_budget_smoke.json").read_text())
    assert set(record["summary"]) == {"hf", "engine", "static", "N=2", "N=4", "auto"}
    assert all(
        s["identical_to_hf"] == "2/2" for s in record["summary"].values()
    )  # greedy: every method exact
    assert record["auto"]["table"]["budget"] == record["auto"]["chosen_nodes"]


def test_verify_step_smoke(tmp_path):
    proc = run("bench_verify_step.py", "--out", str(tmp_path))
    assert "| tree nodes | median ms |" in proc.stdout and not list(
        tmp_path.glob("*.json")
    )  # smoke records nothing


def test_tree_attention_smoke(tmp_path):
    out = tmp_path / "ta.json"
    run("bench_tree_attention.py", "--out", str(out), env={"TRITON_INTERPRET": "1"})
    assert json.loads(out.read_text())


def test_cpu_fast_path_smoke(tmp_path):
    out = tmp_path / "cpu.json"
    proc = run(
        "bench_cpu.py",
        "--dtypes",
        "bfloat16",
        "--out",
        str(out),
        env={"SELFSPEC_CACHE": str(tmp_path / "cache")},
    )
    record = json.loads(out.read_text())["dtypes"]["bfloat16"]
    assert set(record["decode"]) == {"hf", "engine", "static", "dynamic", "auto", "static-batched"}
    # Exact verification: bitwise HF in bf16 for every method that verifies exactly.
    assert all(
        r["identical_to_hf"] == "2/2" for name, r in record["decode"].items() if name != "static-batched"
    )
    assert set(record["verify"]) == {"exact", "batched"} and "| mode | T=1 |" in proc.stdout
