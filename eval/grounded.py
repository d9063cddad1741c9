"""A grounded question set: prompts that embed a passage and ask for work over it.

Replies to such prompts copy from their input (a summary reuses phrases, a rewrite most of the
text, an answer quotes it, a code edit returns the code), which is where lookup drafting
(``selfspec.lookup``) pays and where HF prompt lookup is the baseline to beat. The passages come
from the development data in ``../shared/data/train`` (code from GPTeacher codegen responses,
prose from GPTeacher role-play responses, worked solutions from GSM8K train), never from the
evaluation sets; this module writes prompts around them, nothing is stored in the repository.

Two disjoint splits by passage: ``dev`` (for choosing settings) and ``test`` (for reporting).

    python -m selfspec.eval.grounded --data ../shared/data --split test --out grounded_test.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any

CATEGORIES = ("summarize", "rewrite", "qa", "code_edit")

SUMMARIZE = (
    "Summarize the following text in three or four sentences.\n\n{passage}",
    "Write a short summary of this text, keeping its key phrases.\n\n{passage}",
)
REWRITE = (
    "Rewrite the following text in a more formal tone, keeping all of its content.\n\n{passage}",
    "Correct any errors in the following text and return the full corrected text.\n\n{passage}",
    "Rewrite the following solution as numbered steps, keeping every calculation.\n\n{passage}",
)
_QUOTE = "Read the text and answer the question, quoting the sentences you rely on.\n\nText:\n{passage}\n\n"
QA = (
    _QUOTE + "Question: What advice or instructions does the text give?",
    _QUOTE + "Question: What is the main point of the text, and which sentence states it?",
)
_CODE = "Here is some code:\n\n```\n{passage}\n```\n\n"
CODE_EDIT = (
    _CODE + "Add a short comment above each function and return the complete code.",
    _CODE + "Rename the variables to more descriptive names and return the complete code.",
    _CODE + "Add input validation where it is missing and return the complete code.",
)


def _split_of(text: str) -> str:
    """dev or test, fixed by the passage's content (so splits never share a passage)."""
    return "dev" if hashlib.sha256(text.encode()).digest()[0] % 2 == 0 else "test"


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: --data must be the shared data directory (with train/)")
    return json.loads(path.read_text(encoding="utf-8"))


def passages(data: Path) -> dict[str, list[str]]:
    """Candidate passages per kind: code, prose (documents of a few role-play replies), solutions."""
    train = data / "train"
    code = [
        r["response"].strip()
        for r in _read_json(train / "gpteacher_codegen.json")
        if 250 <= len(r["response"]) <= 1500 and "\n" in r["response"]
    ]
    replies = [
        r["response"].strip()
        for r in _read_json(train / "gpteacher_roleplay.json")
        if 200 <= len(r["response"]) <= 700
    ]
    prose = ["\n\n".join(replies[i : i + 3]) for i in range(0, len(replies) - 2, 3)]
    gsm = train / "gsm8k_train.jsonl"
    if not gsm.is_file():
        raise FileNotFoundError(f"{gsm} is missing: --data must be the shared data directory (with train/)")
    solutions = []
    for line in gsm.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        answer = r["answer"].split("####")[0].strip()
        if len(answer) >= 200:
            solutions.append(f"Problem: {r['question']}\n\nSolution:\n{answer}")
    return {"code": code, "prose": prose, "solution": solutions}


def build(data: Path, split: str, per_category: int, seed: int = 0) -> list[dict[str, Any]]:
    """``per_category`` questions of each category, in MT-bench format, from ``split``'s passages."""
    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    rng = random.Random(seed)
    pools = {kind: [p for p in ps if _split_of(p) == split] for kind, ps in passages(data).items()}
    plan = {"summarize": SUMMARIZE, "rewrite": REWRITE, "qa": QA, "code_edit": CODE_EDIT}
    out: list[dict[str, Any]] = []
    used: set[str] = set()
    for category in CATEGORIES:
        templates = plan[category]
        for k in range(per_category):
            template = templates[k % len(templates)]
            kind = "code" if category == "code_edit" else "solution" if "solution" in template else "prose"
            pool = [p for p in pools[kind] if p not in used]
            passage = rng.choice(pool)
            used.add(passage)
            out.append(
                {
                    "question_id": f"grounded-{split}-{len(out) + 1}",
                    "category": category,
                    "turns": [template.format(passage=passage)],
                    "source": kind,
                }
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m selfspec.eval.grounded",
        description="Write a grounded question set (prompts embedding a passage from the shared "
        "development data: summarize, rewrite, answer with quotes, edit code) in MT-bench format.",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=Path("../shared/data"),
        help="shared data directory (default: %(default)s)",
    )
    p.add_argument(
        "--split", choices=["dev", "test"], default="dev", help="passage split (default: %(default)s)"
    )
    p.add_argument(
        "--per-category", type=int, default=5, help="questions per category (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="which passages are drawn (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    args = p.parse_args(argv)
    try:
        questions = build(args.data, args.split, args.per_category, args.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"grounded: {e}", file=sys.stderr)
        return 2
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
    tmp.replace(args.out)
    print(f"wrote {len(questions)} questions ({args.split}) to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
