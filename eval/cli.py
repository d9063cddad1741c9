"""``selfspec eval``: speed, acceptance and exactness of every decoding method on question sets.

Registered by ``selfspec.cli`` through ``add_eval``; arguments are validated (question files
parsed, methods and paths checked) before any model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from selfspec.eval.config import EvalConfig
from selfspec.options import COMMANDS, UsageError, check_model_arg

PATHS = {"questions", "out"}  # flags read as paths


def add_eval(sub: argparse._SubParsersAction) -> None:
    """The flags are ``EvalConfig``'s fields: name, default, help and choices come from there."""
    p = sub.add_parser(
        "eval",
        help=COMMANDS["eval"][2],
        description="Run HF generate, prompt lookup, assisted generation, the selfspec engine without and "
        "with a drafter, and vLLM, on the same prompts (interleaved, after warm-up, medians over repeats) and "
        "write results.json, report.md, plots and a W&B run (offline by default).",
    )
    hints = typing.get_type_hints(EvalConfig)
    for f in dataclasses.fields(EvalConfig):
        meta = dict(f.metadata)
        flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
        kw: dict[str, Any] = {"dest": f.name, "help": meta.pop("help")}
        kw.update(meta)  # choices, metavar, action, required
        default = f.default if f.default is not dataclasses.MISSING else None
        hint = hints[f.name]
        if hint is bool:
            kw["action"] = "store_false" if default else "store_true"
        elif f.name == "methods":
            kw["default"] = None  # computed from the drafter and --assistant (see _methods)
        else:
            base = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
            kw["type"] = Path if f.name in PATHS else base[0]  # tree (str | int): str, parsed by the config
            if default is not None:
                kw["default"] = Path(default) if f.name in PATHS else default
                kw["help"] += " (default: %(default)s)"
        p.add_argument(flag, **kw)
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
    from selfspec.eval.config import NEEDS_DRAFTER

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

    methods = _methods(args)
    try:
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)}
        values |= {"questions": [str(q) for q in args.questions], "methods": methods, "out": str(args.out)}
        config = EvalConfig(**values)
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
