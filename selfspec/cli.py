"""``selfspec`` command line: thin over the library.

Every subcommand validates its arguments before loading a model; any error the user can act on
is printed as one line (``selfspec: error: ...``) with a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from selfspec.options import (
    CANDIDATES_HELP,
    COMMANDS,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    TREE_HELP,
    VERIFY_HELP,
    UsageError,
    check_model_arg,
    parse_tree,
    pick_drafter,
)


# ------------------------------------------------------------------------------------- generate
def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help=COMMANDS["generate"][2],
        description="Generate a reply with the tree-verify engine (greedy; output identical to the "
        "model's own greedy decoding) and report speed and mean accepted length (tau).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the user message (the chat template is applied for instruct models)")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 text file")
    p.add_argument(
        "--model",
        default="default",
        help="target: 'default' (SmolLM2-135M-Instruct, fetched on first use), a Hugging Face "
        "model id, a local checkpoint directory, or a .gguf file (default: %(default)s)",
    )
    p.add_argument(
        "--drafter",
        default="default",
        help="'default' (the drafter shipped for the default model; none if this build ships "
        "none), 'none' (plain one-token steps), or a directory written by save_pretrained "
        "/ selfspec train (default: %(default)s)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=128, help="tokens to generate at most (default: %(default)s)"
    )
    p.add_argument(
        "--no-chat-template",
        action="store_true",
        help="feed the prompt as raw text, without the chat template",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="model dtype (default: bf16 on CUDA and on CPUs with native bf16 dot products, AVX512_BF16 or AMX; fp32 on other CPUs)",
    )
    p.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: cuda when available)")
    add_decoding_args(p, tree_default="auto")
    p.add_argument(
        "--compare",
        action="store_true",
        help="also run Hugging Face generate and the engine without a drafter on the same "
        "prompt, check the outputs are identical, and print the speedup (medians of "
        "--compare-rounds interleaved runs of each, none of them streamed)",
    )
    p.add_argument(
        "--compare-rounds",
        type=int,
        default=3,
        help="with --compare: timed rounds, each running HF generate, selfspec and the engine "
        "without drafter once, in rotating order (default: %(default)s)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (text, new_tokens, tau, tokens_per_s, wall_s, ...) instead of streaming text",
    )
    p.set_defaults(run=run_generate, check=check_generate)


def add_decoding_args(p: argparse.ArgumentParser, tree_default: str = "static") -> None:
    """Sampling, tree and acceptance flags shared by generate and eval."""
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 = greedy (identical to the model's greedy output); > 0 samples, and the output "
        "follows the model's own distribution exactly (default: %(default)s)",
    )
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass, 1 = off (default: %(default)s)"
    )
    p.add_argument(
        "--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--tree", default=tree_default, help=TREE_HELP + " (default: %(default)s)")
    p.add_argument(
        "--acceptance",
        choices=["exact", "typical"],
        default="exact",
        help="'exact' is lossless; 'typical' (Medusa) accepts more but is lossy (default: %(default)s)",
    )
    p.add_argument(
        "--candidates",
        choices=["auto", "top-k", "sampled"],
        default="auto",
        help=CANDIDATES_HELP + " (default: %(default)s)",
    )
    p.add_argument(
        "--verify",
        choices=["exact", "batched"],
        default="exact",
        help=VERIFY_HELP + " (default: %(default)s)",
    )
    p.add_argument(
        "--lookup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add draft branches copied from the context (n-gram matches in the prompt and the text "
        "generated so far) to every step's tree, within its node budget; with --drafter none it "
        "speculates with no trained drafter. Pays most when the reply repeats its input "
        "(summaries, rewrites, code edits), and paid on chat requests too in our measurements; "
        "--no-lookup turns it off (default: on)",
    )
    p.add_argument(
        "--lookup-len",
        type=int,
        default=12,
        metavar="N",
        help="longest lookup branch in tokens; the length used follows what the model accepted "
        "(default: %(default)s)",
    )


def decoding_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The generate() keyword arguments of the decoding flags (validated early)."""
    from selfspec.sampling import SamplingConfig

    try:
        SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from e
    try:
        tree = parse_tree(args.tree)
    except ValueError as e:
        raise UsageError(str(e)) from e
    lookup = None
    if args.lookup:
        from selfspec.lookup import Lookup

        try:
            lookup = Lookup(max_len=args.lookup_len)
        except ValueError as e:
            raise UsageError(f"--lookup-len: {e}") from e
    return {
        "lookup": lookup,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "tree": tree,
        "acceptance": args.acceptance,
        "verify": args.verify,
        "candidates": args.candidates,
    }


def check_generate(args: argparse.Namespace) -> None:
    args.decoding = decoding_kwargs(args)
    if args.max_new_tokens <= 0:
        raise UsageError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    if args.compare_rounds <= 0:
        raise UsageError(f"--compare-rounds must be a positive integer, got {args.compare_rounds}")
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise UsageError(f"--prompt-file {args.prompt_file} does not exist")
        args.prompt = args.prompt_file.read_text(encoding="utf-8")
    if not args.prompt or not args.prompt.strip():
        raise UsageError("the prompt is empty; pass some text with --prompt or --prompt-file")
    check_model_arg(args.model)
    if args.drafter not in ("default", "none") and not Path(args.drafter).expanduser().is_dir():
        raise UsageError(
            f"--drafter {args.drafter} is not a directory; pass 'default', 'none' or a saved drafter directory"
        )


def encode_prompt(tokenizer: Any, prompt: str, chat: bool):
    if chat and getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        return enc["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def run_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    import selfspec

    model, tokenizer = selfspec.load_target(args.model, dtype=args.dtype, device=args.device)
    drafter = pick_drafter(args.drafter, model, quiet=args.json)
    ids = encode_prompt(tokenizer, args.prompt, chat=not args.no_chat_template)
    streamer = None if args.json else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if args.compare:  # one-off costs (kernel set-up, tree="auto" timing) stay out of the compared runs
        selfspec.generate(model, ids, drafter=drafter, max_new_tokens=8, **args.decoding)
        selfspec.generate(model, ids, drafter=None, max_new_tokens=8)
        model.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
    result = selfspec.generate(
        model, ids, drafter=drafter, max_new_tokens=args.max_new_tokens, streamer=streamer, **args.decoding
    )
    s = result.stats
    report: dict[str, Any] = {
        "text": tokenizer.decode(result.sequences[0, ids.shape[1] :], skip_special_tokens=True),
        "new_tokens": s.new_tokens,
        "tau": round(s.mean_accepted_length, 4),
        "tokens_per_s": round(s.tokens_per_s, 3),
        "wall_s": round(s.wall_s, 4),
        "steps": s.steps,
        "accepted_hist": s.accepted_hist,
        "prompt_tokens": int(ids.shape[1]),
        "model": args.model,
        "temperature": args.temperature,
        "tree": str(args.tree),
        "drafter": "none" if drafter is None else args.drafter,
        "device": str(model.device),
        "tree_nodes": s.tree_nodes,
        "dtype": str(model.dtype).removeprefix("torch."),
        "verify": args.verify,
        "lookup": bool(args.lookup),
        "lookup_proposed": s.lookup_proposed,
        "lookup_accepted": s.lookup_accepted,
    }
    if args.compare:
        report.update(
            compare(
                model,
                ids,
                args.max_new_tokens,
                result,
                torch,
                sampled=args.temperature > 0,
                drafter=drafter,
                decoding=args.decoding,
                rounds=args.compare_rounds,
            )
        )
    if args.json:
        print(json.dumps(report))
    else:
        print_summary(report)
    return 0


def compare(
    model: Any,
    ids: Any,
    max_new_tokens: int,
    result: Any,
    torch: Any,
    sampled: bool = False,
    drafter: Any = None,
    decoding: dict | None = None,
    rounds: int = 3,
) -> dict[str, Any]:
    """HF greedy generate, selfspec (as configured) and the drafter-less engine on the same prompt,
    ``rounds`` times each in rotating order (this CPU's speed drifts by 10-20% between runs, so one
    run each is not a measurement); the speedups are ratios of median tokens/s. Identity with HF
    (only meaningful for greedy runs) must hold for every selfspec run, the streamed one included."""
    import statistics

    import selfspec

    def hf():
        start = time.perf_counter()
        out = model.generate(
            ids.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            attention_mask=torch.ones_like(ids).to(model.device),
        )
        return out, (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)

    def ours():
        res = selfspec.generate(
            model, ids, drafter=drafter, max_new_tokens=max_new_tokens, **(decoding or {})
        )
        return res.sequences, res.stats.tokens_per_s

    def plain():
        res = selfspec.generate(model, ids, drafter=None, max_new_tokens=max_new_tokens)
        return res.sequences, res.stats.tokens_per_s

    runs: dict[str, list] = {"hf": [], "selfspec": [], "engine": []}
    methods = list(zip(runs, (hf, ours, plain)))
    for r in range(rounds):
        for name, fn in methods[r % 3 :] + methods[: r % 3]:
            runs[name].append(fn())
    ref = runs["hf"][0][0].cpu()
    speed = {name: statistics.median(tps for _, tps in out) for name, out in runs.items()}
    identical = all(
        torch.equal(seq.cpu(), ref) for seq in [result.sequences] + [s for s, _ in runs["selfspec"]]
    )
    return {
        "hf_tokens_per_s": round(speed["hf"], 3),
        "engine_tokens_per_s": round(speed["engine"], 3),
        "selfspec_tokens_per_s_median": round(speed["selfspec"], 3),
        "compare_rounds": rounds,
        "speedup_vs_hf": round(speed["selfspec"] / speed["hf"], 3),
        "speedup_vs_engine": round(speed["selfspec"] / speed["engine"], 3),
        "speedup_vs_hf_per_round": [round(o[1] / h[1], 3) for o, h in zip(runs["selfspec"], runs["hf"])],
        "identical_to_hf": None if sampled else bool(identical),
    }


def print_summary(r: dict[str, Any]) -> None:
    line = (
        f"\n[selfspec] {r['new_tokens']} tokens in {r['wall_s']:.2f}s = {r['tokens_per_s']:.1f} tok/s, "
        f"tau {r['tau']:.2f} over {r['steps']} verify steps, drafter: {r['drafter']}"
    )
    if r.get("lookup"):
        line += f", lookup: {r['lookup_accepted']} of {r['lookup_proposed']} proposed tokens kept"
    print(line, file=sys.stderr)
    if "speedup_vs_hf" in r:
        per_round = r.get("speedup_vs_hf_per_round") or []
        spread = f" (rounds: {min(per_round):.2f}-{max(per_round):.2f}x)" if len(per_round) > 1 else ""
        print(
            f"[selfspec] {r['dtype']}, {r['verify']} verification, median of {r.get('compare_rounds', 1)} "
            f"interleaved runs each: selfspec {r.get('selfspec_tokens_per_s_median', r['tokens_per_s']):.1f} tok/s, "
            f"HF generate ({r['dtype']}) {r['hf_tokens_per_s']:.1f} tok/s, engine without drafter "
            f"{r['engine_tokens_per_s']:.1f} tok/s -> speedup {r['speedup_vs_hf']:.2f}x vs HF{spread}, "
            f"{r['speedup_vs_engine']:.2f}x vs no drafter; output identical to HF: {r['identical_to_hf']}",
            file=sys.stderr,
        )
        if r["drafter"] != "none" and r["tree"] == "auto" and r["tree_nodes"] == 1:
            print(
                f"[selfspec] --tree auto measured every tree size on {r['device']} and decoded without drafting: "
                "no tree was expected to keep enough tokens for its verify cost here (see "
                "benchmarks/README.md, 'CPU fast path'); --verify batched is cheaper but exact only up to "
                "floating-point near-ties",
                file=sys.stderr,
            )
        elif r["drafter"] != "none" and r["speedup_vs_engine"] < 1:
            fix = (
                "--tree auto chose this size from timings cached in $SELFSPEC_CACHE/autotune.json; delete that "
                "file to time again, or pass"
                if r["tree"] == "auto"
                else "try --tree auto (measures this device and may decide not to draft) or"
            )
            print(
                f"[selfspec] the drafter made decoding slower here: a verify step over {r['tree_nodes']} nodes "
                f"costs more on {r['device']} than the {r['tau']:.2f} tokens it keeps; {fix} --drafter none",
                file=sys.stderr,
            )


# ------------------------------------------------------------------------------------------ main
def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser; given ``argv``, only the command it names is built for real (its module
    imported) and the others are listed by name and help, so ``--help`` and ``generate`` load no
    training or eval code."""
    parser = argparse.ArgumentParser(
        prog="selfspec",
        description="Lossless self-speculative decoding for Hugging Face causal LMs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    for name, (module, add, help_text) in COMMANDS.items():
        if argv is None or name == wanted:
            getattr(importlib.import_module(module), add)(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(sys.argv[1:] if argv is None else argv).parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars; our own output says what happens
    hf_logging.set_verbosity_error()
    try:
        args.check(args)
        return args.run(args)
    except UsageError as e:
        print(f"selfspec: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"selfspec: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("selfspec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
