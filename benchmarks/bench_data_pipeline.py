"""Throughput of the drafter's data pipeline (issue 12): self-distillation and feature capture,
the target in fp32 (the pipeline before) and in bf16 (``--data-dtype auto`` on a CPU with native
bf16), in one process, rounds interleaved, with the unbatched-greedy agreement of each dtype's
batched replies.

    python benchmarks/bench_data_pipeline.py --prompts 32 --new-tokens 96 --rounds 3 \
        --out benchmarks/results/data_pipeline_cpu.json

Prompts come from ../shared/data/train (never the eval sets), a seeded sample per source. The
test suite runs it with ``--smoke`` (toy prompts, 4 tokens, 1 round).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import torch

import selfspec
from selfspec.eval.measure import environment
from selfspec.io import atomic_write_json
from selfspec.training.config import DataConfig, DistillConfig, FeatureConfig
from selfspec.training.data import load_all
from selfspec.training.distillation import distill, sequences
from selfspec.training.features import capture
from selfspec.training.pipeline import drafter_feature_layers

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT.parent / "shared" / "data" / "train"
SOURCES = [
    "gsm8k_train.jsonl",
    "gpteacher_codegen.json",
    "gpteacher_roleplay.json",
    "fastchat_dummy_conversation.json",
]


def examples(args):
    if args.smoke:  # toy prompts: the suite must not depend on ../shared/data
        from selfspec.training.data import Example

        return [Example(id=f"smoke:{i}", messages=(("user", f"Name {i + 2} colors."),)) for i in range(2)]
    per = -(-args.prompts // len(SOURCES))
    found, _ = load_all(DataConfig(sources=[str(TRAIN / s) for s in SOURCES], max_per_source=per), seed=1)
    return found[: args.prompts]


def one_round(model, tokenizer, exs, args, batch: int, tmp: Path, tag: str) -> dict:
    config = DistillConfig(max_new_tokens=args.new_tokens, batch_size=batch, check=args.check)
    records, d = distill(model, tokenizer, exs, tmp / f"distill-{tag}", config)
    items = list(sequences(records))
    layers = drafter_feature_layers("eagle3", model)
    f = capture(model, items, tmp / f"features-{tag}", FeatureConfig(feature_layers=layers))
    return {
        "distill_tokens": d.new_tokens,
        "distill_s": d.seconds,
        "distill_tok_s": d.new_tokens / d.seconds,
        "check_prompts": d.check_prompts,
        "check_identical": d.check_identical,
        "check_token_agreement": d.check_token_agreement,
        "capture_tokens": f.tokens,
        "capture_s": f.seconds,
        "capture_tok_s": f.tokens / f.seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="target model (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=32, help="training prompts per round")
    p.add_argument("--new-tokens", type=int, default=96, help="longest distilled reply")
    p.add_argument("--batch", type=int, default=16, help="distillation batch of the fp32 baseline and bf16")
    p.add_argument("--bf16-batches", type=int, nargs="*", default=[32], help="extra bf16 batch sizes")
    p.add_argument("--check", type=int, default=8, help="replies regenerated unbatched per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="JSON record")
    p.add_argument(
        "--smoke", action="store_true", help="toy sizes (2 prompts, 4 tokens, 1 round): the test suite"
    )
    args = p.parse_args()
    if args.smoke:
        args.prompts, args.new_tokens, args.rounds, args.check, args.batch, args.bf16_batches = (
            2,
            4,
            1,
            1,
            2,
            [],
        )
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model, tokenizer = selfspec.load_target(args.model, dtype="float32")
        with torch.no_grad():
            bf16 = copy.deepcopy(model).to(torch.bfloat16)
        configs = {f"float32 b{args.batch}": (model, args.batch)}
        for b in [args.batch, *args.bf16_batches]:
            configs[f"bfloat16 b{b}"] = (bf16, b)
        exs = examples(args)
        runs: dict[str, list[dict]] = {name: [] for name in configs}
        for r in range(args.rounds):
            for name, (m, batch) in configs.items():
                tag = f"{name.replace(' ', '-')}-{r}"
                runs[name].append(one_round(m, tokenizer, exs, args, batch, tmp, tag))
                last = runs[name][-1]
                print(
                    f"round {r} {name}: distill {last['distill_tok_s']:.1f} tok/s, capture "
                    f"{last['capture_tok_s']:.1f} tok/s, check {last['check_identical']}/{last['check_prompts']}",
                    flush=True,
                )
    base = f"float32 b{args.batch}"
    summary = {}
    for name, rs in runs.items():
        summary[name] = {}
        for key in ("distill_tok_s", "capture_tok_s"):
            vals = [x[key] for x in rs]
            ratios = [x[key] / b[key] for x, b in zip(rs, runs[base])]
            summary[name][key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
            summary[name][key + "_vs_fp32"] = {
                "median": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
            }
        summary[name]["check_identical"] = sum(x["check_identical"] for x in rs)
        summary[name]["check_prompts"] = sum(x["check_prompts"] for x in rs)
        summary[name]["check_token_agreement"] = statistics.mean(x["check_token_agreement"] for x in rs)
    print(
        f"{'config':<14} {'distill tok/s':>14} {'vs fp32':>8} {'capture tok/s':>14} {'vs fp32':>8}  unbatched check"
    )
    for name, s in summary.items():
        print(
            f"{name:<14} {s['distill_tok_s']['median']:>14.1f} {s['distill_tok_s_vs_fp32']['median']:>7.2f}x "
            f"{s['capture_tok_s']['median']:>14.1f} {s['capture_tok_s_vs_fp32']['median']:>7.2f}x  "
            f"{s['check_identical']}/{s['check_prompts']} identical, "
            f"{s['check_token_agreement']:.1%} tokens before a difference"
        )
    if args.out:
        record = {
            "environment": environment(torch.device("cpu"), torch.float32),
            "settings": vars(args) | {"out": str(args.out)},
            "summary": summary,
            "runs": runs,
        }
        atomic_write_json(args.out, record)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
