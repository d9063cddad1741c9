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


def test_gpu_check_smoke_runs_every_check_and_records_them(tmp_path):
    """benchmarks/gpu_check.py --smoke: the GPU lease's one command, at toy sizes on the CPU."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(tmp_path), "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [c["name"] for c in summary["checks"]] == [
        "kernel_tests",
        "tree_attention_bench",
        "verify_step_bench",
    ]
    assert all(c["rc"] == 0 and c["seconds"] > 0 for c in summary["checks"])
    assert {"torch", "triton", "transformers", "device", "date", "command"} <= set(summary)
    assert (tmp_path / "kernel_tests.xml").is_file() and (tmp_path / "tree_attention.json").is_file()


def test_gpu_check_fails_soft(tmp_path, monkeypatch):
    """A failing or timed-out check is recorded, the next one still runs, and the exit code says so."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    fake = [
        gpu_check.Check("fails", "exits 3", [sys.executable, "-c", "import sys; sys.exit(3)"], 30),
        gpu_check.Check(
            "hangs", "sleeps past its limit", [sys.executable, "-c", "import time; time.sleep(30)"], 1
        ),
        gpu_check.Check("passes", "exits 0", [sys.executable, "-c", "print('ok')"], 30),
        gpu_check.Check("model", "needs the GGUF", [sys.executable, "-c", "pass"], 30, needs_gguf=True),
    ]
    monkeypatch.setattr(gpu_check, "checks", lambda smoke: fake)
    assert gpu_check.main([str(tmp_path)]) == 1
    rcs = {c["name"]: c["rc"] for c in json.loads((tmp_path / "summary.json").read_text())["checks"]}
    assert rcs == {"fails": 3, "hangs": "timeout", "passes": 0, "model": "skipped"}


def test_data_pipeline_smoke(tmp_path):
    """benchmarks/bench_data_pipeline.py --smoke: distillation and capture in fp32 and bf16 on the
    default model at toy sizes, with the unbatched check, recorded as JSON."""
    out = tmp_path / "data.json"
    run("bench_data_pipeline.py", "--out", str(out))
    record = json.loads(out.read_text())
    assert set(record["summary"]) == {"float32 b2", "bfloat16 b2"}
    for s in record["summary"].values():
        assert s["distill_tok_s"]["median"] > 0 and s["capture_tok_s"]["median"] > 0
        assert s["check_prompts"] == 1
    assert record["summary"]["float32 b2"]["distill_tok_s_vs_fp32"]["median"] == 1.0


def test_candidates_smoke(tmp_path):
    out = tmp_path / "candidates_smoke.json"
    run(
        "bench_candidates.py", "--temperatures", "1.0", "--trees", "static", "--seeds", "1", "--out", str(out)
    )
    record = json.loads(out.read_text())
    assert set(record["summary"]) == {"T=1.0 tree=static top-k", "T=1.0 tree=static sampled"}
    assert all(s["tau"] >= 1 for s in record["summary"].values())


def test_drafters_smoke(tmp_path):
    out = tmp_path / "drafters_smoke.json"
    run("bench_drafters.py", "--trees", "static,dynamic", "--out", str(out))
    record = json.loads(out.read_text())
    assert set(record["summary"]) == {
        "hf",
        "eagle3 tree=static",
        "eagle3 tree=dynamic",
        "block tree=static",
        "block tree=dynamic",
    }
    for s in record["summary"].values():  # fp32 tiny model: exact, so every reply equals HF's
        assert s["identical"] == s["prompts"] == 2 and s["tau"] >= 1
