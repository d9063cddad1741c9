"""Live export check (issue 14): selfspec's exported drafters in a real vLLM (its CPU build).

For each export format vLLM loads (eagle3, eagle, medusa) this script
  1. takes a drafter of that kind for the default model (eagle3: the shipped drafter; eagle and
     medusa: a tiny one trained once with `selfspec train` and cached under
     $SELFSPEC_CACHE/vllm-live-check/),
  2. exports it with `selfspec export`,
  3. decodes the same prompts greedily in fp32 with selfspec (the drafter on a chain of k tokens)
     and with HF `generate`, and, in vLLM's own venv (selfspec.eval.vllm, created once), with
     vLLM without speculation and with the exported drafter (num_speculative_tokens = k),
  4. compares: every output equals HF's greedy output, and vLLM's drafts and accepted tokens per
     position (its spec-decode counters) equal selfspec's, prompt by prompt.
Prints a table, writes everything to --out (JSON) and exits 1 when anything differs or a format
does not load.

    python benchmarks/vllm_live_check.py --out benchmarks/results/vllm_live_check_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from prompts import MT_BENCH, questions

FORMATS = ("eagle3", "eagle", "medusa")
# tiny drafters for the check: trained once on two shared training sets (never the eval sets);
# eagle and medusa keep the full vocabulary: the EAGLE-1 layouts have no draft vocabulary, and vLLM
# 0.32 refuses a Medusa checkpoint with a token_map (its loader registers it but never reports it loaded)
TRAIN = {
    "eagle": ["--kind", "eagle", "--draft-vocab-size", "0"],
    "medusa": [
        "--kind",
        "medusa",
        "--draft-vocab-size",
        "0",
    ],  # vLLM 0.32 cannot load a token_map (see README)
}
TRAIN_COMMON = [
    "--data", str(MT_BENCH.parents[1] / "train" / "gpteacher_roleplay.json"),
    "--data", str(MT_BENCH.parents[1] / "train" / "gsm8k_train.jsonl"),
    "--max-per-source", "40", "--max-new-tokens", "96", "--steps", "150", "--batch-tokens", "512",
    "--unroll", "1", "--held-out", "8",
    "--tau-prompts", "0", "--eval-every", "0", "--wandb", "disabled",
]  # fmt: skip


def cache() -> Path:
    return Path(os.environ.get("SELFSPEC_CACHE", Path.home() / ".cache" / "selfspec"))


def drafter_for(fmt: str, log) -> str:
    """The drafter directory checked for ``fmt``: the shipped one, or a tiny one trained once."""
    if fmt == "eagle3":
        return "default"
    out = cache() / "vllm-live-check" / fmt
    if not (out / "config.json").is_file():
        cmd = ["selfspec", "train", "--out", str(out), "--overwrite", *TRAIN[fmt], *TRAIN_COMMON]
        log(f"training a tiny {fmt} drafter (once): {shlex.join(cmd)}")
        subprocess.run(cmd, check=True)
    return str(out)


def selfspec_side(model, tok, prompts, drafters, k, max_tokens) -> dict:
    """HF greedy outputs, and per format selfspec's outputs and per-position acceptance."""
    import torch

    import selfspec

    out: dict = {"hf": [], "formats": {}}
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            seq = model.generate(x, do_sample=False, max_new_tokens=max_tokens, pad_token_id=tok.eos_token_id)
        out["hf"].append(seq[0, len(ids) :].tolist())
    for fmt, path in drafters.items():
        drafter = selfspec.load_drafter(path, model)
        rows = []
        for ids in prompts:
            r = selfspec.generate(
                model, torch.tensor([ids]), drafter=drafter, tree=selfspec.chain(k), max_new_tokens=max_tokens
            )
            hist = r.stats.accepted_hist
            per_pos = [sum(hist[d + 2 :]) for d in range(k)]  # steps keeping >= d + 1 drafted tokens
            rows.append(
                {"output": r.sequences[0, len(ids) :].tolist(), "drafts": r.stats.steps, "per_pos": per_pos}
            )
        out["formats"][fmt] = rows
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--formats", nargs="+", default=list(FORMATS), choices=FORMATS, help="export formats to check"
    )
    ap.add_argument("--drafter", action="append", default=[], metavar="FORMAT=DIR",
                    help="check this drafter for FORMAT instead of the shipped/tiny one (repeatable)")  # fmt: skip
    ap.add_argument("--prompts", type=int, default=8, help="MT-bench first turns, one per category in order")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--k", type=int, default=3, help="chain length: vLLM num_speculative_tokens")
    ap.add_argument(
        "--venv", default=None, help="vLLM CPU venv (default: $SELFSPEC_CACHE/vllm-cpu-venv, made once)"
    )
    ap.add_argument("--work-dir", type=Path, default=None, help="exports go here (default: a temporary dir)")
    ap.add_argument("--out", type=Path, default=None, help="write the results here (JSON)")
    args = ap.parse_args()

    def log(msg: str) -> None:
        print(f"[live-check] {msg}", file=sys.stderr, flush=True)

    overrides = dict(item.split("=", 1) for item in args.drafter)
    start = time.perf_counter()

    from selfspec.eval import vllm as V

    log("vLLM CPU venv (created on first use: several minutes)")
    vllm_python = V.ensure_venv(Path(args.venv) if args.venv else None, log)

    import torch
    import transformers

    import selfspec
    from selfspec.models import default_checkpoint

    torch.manual_seed(0)
    drafters = {fmt: overrides.get(fmt) or drafter_for(fmt, log) for fmt in args.formats}
    model, tok = selfspec.load_target("default", dtype="float32", device="cpu")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="selfspec-live-check-"))
    exports = {}
    for fmt, path in drafters.items():
        exports[fmt] = work / f"export-{fmt}"
        cmd = ["selfspec", "export", "--drafter", path, "--format", fmt, "--out", str(exports[fmt])]
        log(shlex.join(cmd))
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    texts = questions(MT_BENCH, 1)[: args.prompts]
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False)
        for q in texts
    ]  # fmt: skip
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]

    log(f"selfspec + HF, fp32, {len(prompts)} prompts x {args.max_tokens} tokens, chain of {args.k}")
    t0 = time.perf_counter()
    ours = selfspec_side(model, tok, prompts, drafters, args.k, args.max_tokens)
    ours_s = time.perf_counter() - t0
    del model

    log(f"vLLM, fp32, the same prompts: no speculation, then each export with k = {args.k}")
    t0 = time.perf_counter()
    by_name, version = {}, None
    for name in ["none", *args.formats]:
        spec = (
            None
            if name == "none"
            else {"method": name, "model": str(exports[name]), "num_speculative_tokens": args.k}
        )
        try:
            worker = V.Worker(
                vllm_python, str(default_checkpoint()), "float32", spec, work / f"vllm-{name}.log"
            )
        except RuntimeError as e:  # a format the engine does not load is a result
            by_name[name] = {"loaded": False, "error": str(e)[:2000]}
            continue
        version = worker.version
        rows = [worker.generate(ids, args.max_tokens, {"temperature": 0.0}) for ids in prompts]
        worker.close()
        by_name[name] = {"loaded": True, "prompts": [r | {"output": r["tokens"]} for r in rows]}
    vllm_s = time.perf_counter() - t0
    theirs = {"vllm": version}

    ok, report = True, {}
    base = by_name["none"]
    for name, res in by_name.items():
        entry: dict = {"loaded": res["loaded"]}
        if not res["loaded"]:
            ok = False
            entry["error"] = res["error"]
            report[name] = entry
            continue
        v_out = [p["output"] for p in res["prompts"]]
        entry["vllm_equals_hf"] = sum(a == b for a, b in zip(v_out, ours["hf"]))
        entry["vllm_equals_vllm_no_spec"] = sum(
            a["output"] == b["output"] for a, b in zip(res["prompts"], base["prompts"])
        )
        entry["vllm_seconds"] = round(sum(p["seconds"] for p in res["prompts"]), 3)
        if name != "none":
            mine = ours["formats"][name]
            entry["selfspec_equals_hf"] = sum(m["output"] == h for m, h in zip(mine, ours["hf"]))
            entry["vllm_drafts"] = [p["drafts"] for p in res["prompts"]]
            entry["selfspec_drafts"] = [m["drafts"] for m in mine]
            entry["vllm_per_pos"] = [p["per_pos"] for p in res["prompts"]]
            entry["selfspec_per_pos"] = [m["per_pos"] for m in mine]
            entry["acceptance_equal"] = sum(
                p["per_pos"] == m["per_pos"] and p["drafts"] == m["drafts"]
                for p, m in zip(res["prompts"], mine)
            )
            tot_v = [sum(c) for c in zip(*entry["vllm_per_pos"])]
            tot_s = [sum(c) for c in zip(*entry["selfspec_per_pos"])]
            entry["accepted_per_pos_total"] = {"vllm": tot_v, "selfspec": tot_s}
            entry["tau_vllm"] = round(1 + sum(tot_v) / max(1, sum(entry["vllm_drafts"])), 3)
            ok &= entry["acceptance_equal"] == len(prompts) and entry["selfspec_equals_hf"] == len(prompts)
        ok &= entry["vllm_equals_hf"] == len(prompts)
        report[name] = entry

    n = len(prompts)
    print(
        f"{'config':8} {'loads':5} {'vLLM=HF':8} {'ours=HF':8} {'accept equal':13} per-position accepted (vLLM | selfspec)"
    )
    for name, e in report.items():
        if not e["loaded"]:
            print(f"{name:8} {'no':5} {e['error'][:100]}")
            continue
        acc = f"{e['acceptance_equal']}/{n}" if name != "none" else "-"
        ours_eq = f"{e['selfspec_equals_hf']}/{n}" if name != "none" else "-"
        tot = e.get("accepted_per_pos_total")
        print(
            f"{name:8} {'yes':5} {e['vllm_equals_hf']}/{n:<6} {ours_eq:8} {acc:13} {tot['vllm'] if tot else ''} | {tot['selfspec'] if tot else ''}"
        )
    total_s = time.perf_counter() - start
    print(f"{'PASS' if ok else 'FAIL'} in {total_s:.0f} s (selfspec+HF {ours_s:.0f} s, vLLM {vllm_s:.0f} s)")
    if args.out:
        versions = {"torch": torch.__version__, "transformers": transformers.__version__}
        versions |= {"selfspec": selfspec.__version__, "vllm": theirs["vllm"]}
        seconds = {"total": round(total_s, 1), "selfspec_and_hf": round(ours_s, 1), "vllm": round(vllm_s, 1)}
        record = {
            "what": "issue 14: exported drafters in a live vLLM CPU, fp32 greedy, against selfspec and HF",
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": shlex.join([sys.executable, *sys.argv]),
            "device": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "versions": versions,
            "prompts": n,
            "max_tokens": args.max_tokens,
            "k": args.k,
            "drafters": drafters,
            "seconds": seconds,
            "pass": ok,
            "report": report,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
