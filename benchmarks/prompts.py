"""The prompt set the CPU benchmarks share (bench_cpu.py and vllm_cpu/run.py, which runs in
vLLM's own venv): standard library only."""

import json
from pathlib import Path

MT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval" / "mt_bench.jsonl"


def questions(path: Path, per_category: int) -> list[str]:
    """First turns, the first ``per_category`` questions of each category, in file order."""
    taken: dict[str, int] = {}
    out = []
    for line in path.read_text().splitlines():
        q = json.loads(line)
        if taken.get(q["category"], 0) < per_category:
            taken[q["category"]] = taken.get(q["category"], 0) + 1
            out.append(q["turns"][0])
    return out
