"""Lookup drafting rules side by side (issue 13): the current ``selfspec.lookup.Lookup`` against
the earlier rule (one running mean of tokens kept sets every branch's length, 2 branches), loaded
from git at ``--baseline-commit`` so the comparison runs in one process, prompts interleaved.

    python benchmarks/lookup_policy.py --questions /tmp/grounded_dev12.jsonl \
        --questions /tmp/dev_chat6.jsonl [--drafter default] --out results/x.json

Development prompts only (never ../shared/data/eval). Needs a git checkout (for the baseline).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def baseline_lookup_class(commit: str):
    """``Lookup`` as it was at ``commit``, usable by the current engine."""
    from selfspec.lookup import Lookup

    source = subprocess.run(
        ["git", "show", f"{commit}:selfspec/lookup.py"], capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_lookup.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_lookup", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_lookup"] = module
    spec.loader.exec_module(module)

    class Baseline(module.Lookup, Lookup):  # the engine checks isinstance(lookup, Lookup)
        pass

    return Baseline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", action="append", required=True, help="jsonl question file (repeatable)")
    ap.add_argument("--drafter", default=None, help="drafter name or path (default: lookup only)")
    ap.add_argument("--baseline-commit", default="8b8145e", help="commit holding the earlier rule")
    ap.add_argument("--rounds", type=int, default=1, help="passes over the prompts (default 1)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the results here (json)")
    args = ap.parse_args()
    for f in args.questions:
        if not Path(f).is_file():
            ap.error(f"--questions {f}: no such file")
    torch.set_num_threads(args.threads)

    import selfspec
    from selfspec.eval.measure import environment
    from selfspec.eval.questions import encode_conversation
    from selfspec.lookup import Lookup

    model, tok = selfspec.load_target("default", dtype="bfloat16")
    drafter = selfspec.load_drafter(args.drafter, model) if args.drafter else None
    variants = {"baseline": baseline_lookup_class(args.baseline_commit)(), "current": Lookup()}
    results = {}
    for f in args.questions:
        qs = [json.loads(line) for line in Path(f).read_text().splitlines() if line.strip()]
        tot = {k: {"tokens": 0, "seconds": 0.0, "proposed": 0, "kept": 0, "per_prompt": []} for k in variants}
        reference = {}
        for rnd in range(args.rounds):
            for i, q in enumerate(qs):
                ids = encode_conversation(tok, [{"role": "user", "content": q["turns"][0]}], True)
                ids = torch.as_tensor(ids).reshape(1, -1)
                order = list(variants) if (i + rnd) % 2 == 0 else list(variants)[::-1]
                for k in order:
                    kw = {"drafter": drafter, "tree": "auto"} if drafter is not None else {}
                    r = selfspec.generate(
                        model, ids, max_new_tokens=args.max_new_tokens, lookup=variants[k], **kw
                    )
                    seq = r.sequences[0].tolist()
                    if reference.setdefault(i, seq) != seq:
                        raise SystemExit(f"outputs differ between rules on question {i} of {f}")
                    t = tot[k]
                    t["tokens"] += r.stats.new_tokens
                    t["seconds"] += r.stats.wall_s
                    t["proposed"] += r.stats.lookup_proposed
                    t["kept"] += r.stats.lookup_accepted
                    t["per_prompt"].append(round(r.stats.tokens_per_s, 2))
        for t in tot.values():
            t["tok_s"] = round(t["tokens"] / t["seconds"], 2)
            t["per_prompt_median"] = statistics.median(t["per_prompt"])
            t["per_prompt_min_max"] = [min(t["per_prompt"]), max(t["per_prompt"])]
        results[f] = tot
        print(f, {k: (t["tok_s"], f"{t['kept']}/{t['proposed']} kept") for k, t in tot.items()}, flush=True)
    record = {
        "environment": environment(model.device, model.dtype),
        "drafter": args.drafter,
        "results": results,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
