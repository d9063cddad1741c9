"""Write chat requests from the development data (../shared/data/train) in MT-bench format: the
open questions on which a default setting is chosen, so that the evaluation sets only measure.

Role-play and code instructions from GPTeacher (no embedded passage, so nothing to copy), GSM8K
questions; drawn with a fixed seed, never from ../shared/data/eval.

    python benchmarks/dev_chat.py --per-source 4 --out /tmp/dev_chat.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--per-source", type=int, default=4, help="requests from each of the three sources")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    train = args.data / "train"
    rng = random.Random(args.seed)
    sources = {
        "roleplay": [
            r["instruction"]
            for r in json.loads((train / "gpteacher_roleplay.json").read_text())
            if not r["input"]
        ],
        "coding": [
            r["instruction"]
            for r in json.loads((train / "gpteacher_codegen.json").read_text())
            if not r["input"]
        ],
        "math": [
            json.loads(line)["question"] for line in (train / "gsm8k_train.jsonl").read_text().splitlines()
        ],
    }
    rows = []
    for category, pool in sources.items():
        for text in rng.sample(pool, args.per_source):
            rows.append({"question_id": f"dev-chat-{len(rows) + 1}", "category": category, "turns": [text]})
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} requests to {args.out}")


if __name__ == "__main__":
    main()
