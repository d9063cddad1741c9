"""``selfspec train`` and ``selfspec export``, registered by ``selfspec.cli``.

Train flags are generated from the config dataclasses (one flag per field, its help string as
the help), so every setting has one name, one default and one validation. A flag the user passes
wins over the ``--preset``; everything is validated before a model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from selfspec.options import COMMANDS, UsageError, check_model_arg
from selfspec.training.config import (
    ENGINES,
    EXPORT_FORMATS,
    CalibrationConfig,
    DataConfig,
    DistillConfig,
    FeatureConfig,
    RunConfig,
    Settings,
    TrainConfig,
    check_work_dir,
)
from selfspec.training.presets import PRESETS, preset

SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "distill": DistillConfig,
    "features": FeatureConfig,
    "train": TrainConfig,
    "calibrate": CalibrationConfig,
}
FLAG_NAMES = {  # (section, field) -> flag, where the plain field name would be ambiguous or unclear
    ("data", "sources"): "data",
    ("data", "format"): "data-format",
    ("data", "cache_dir"): "datasets-cache",
    ("distill", "batch_size"): "distill-batch-size",
    ("distill", "seed"): "distill-seed",
    ("distill", "check"): "distill-check",
    ("features", "max_tokens"): "max-feature-tokens",
    ("features", "batch_tokens"): "feature-batch-tokens",
    ("features", "dtype"): "feature-dtype",
    ("calibrate", "depth"): "tree-depth",
    ("calibrate", "top_k"): "tree-top-k",
    ("calibrate", "batch_tokens"): "calibrate-batch-tokens",
}


def _flag(section: str, name: str) -> str:
    return "--" + FLAG_NAMES.get((section, name), name.replace("_", "-"))


def _dest(section: str, name: str) -> str:
    return f"{section}__{name}"


def _with_defaults(text: str | None, section: str, f: dataclasses.Field) -> str | None:
    """The field's help plus its default and what each preset sets it to, e.g. "(default: 2;
    quick: 2, full: 3)": presets change many values, and --help should show them."""
    default = (
        f.default
        if f.default is not dataclasses.MISSING
        else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    )
    parts = [] if default in (None, "", [], False) else [f"default: {default}"]
    by_preset = [
        f"{name}: {values[section][f.name]}"
        for name, values in PRESETS.items()
        if f.name in values.get(section, {})
    ]
    if by_preset:
        parts.append(", ".join(by_preset))
    if not parts:
        return text
    return f"{text or ''} ({'; '.join(parts)})".replace("%", "%%")


def _add_fields(
    group: argparse._ArgumentGroup, section: str, cls: type, skip: set[str] = frozenset()
) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kw: dict[str, Any] = {
            "dest": _dest(section, f.name),
            "default": argparse.SUPPRESS,
            "help": _with_defaults(f.metadata.get("help"), section, f),
        }
        hint = hints[f.name]
        if hint is not bool:
            kw["metavar"] = f.name.upper()
        if hint is bool:
            kw["action"] = "store_true"
        elif typing.get_origin(hint) is list:
            item = typing.get_args(hint)[0]
            kw.update(type=item, action="append" if item is str else None, nargs=None if item is str else "+")
            kw = {k: v for k, v in kw.items() if v is not None}
        else:
            base = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
            kw["type"] = base[0]
        group.add_argument(_flag(section, f.name), **kw)


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help=COMMANDS["train"][2],
        description="Self-distill the target on your prompts, cache its features, train a Medusa or EAGLE "
        "drafter, calibrate its tree on held-out data and save it for `selfspec generate --drafter OUT`. "
        "Runs unchanged under `accelerate launch` / `torchrun` on several GPUs.",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="bundle of settings: quick (CPU, ~30 min, default "
        "model) or full (GPU); flags you pass override it",
    )
    run = p.add_argument_group("run")
    _add_fields(run, "run", RunConfig)
    for section, cls in SECTIONS.items():
        _add_fields(p.add_argument_group(section), section, cls)
    p.set_defaults(run=run_train, check=check_train)


def build_settings(args: argparse.Namespace):
    """Settings from preset + flags; ValueError (from the configs' own checks) on bad values."""

    chosen = preset(getattr(args, "preset", None))
    values: dict[str, dict[str, Any]] = {s: dict(chosen.get(s, {})) for s in ("run", *SECTIONS)}
    for key, value in vars(args).items():
        if "__" in key:
            section, name = key.split("__", 1)
            values[section][name] = value
    if "train__steps" in vars(args) and "run__time_budget" not in vars(args):
        values["run"]["time_budget"] = ""  # steps the user chose win over a preset's budget
    classes = {"run": RunConfig, **SECTIONS}
    return Settings(**{s: classes[s](**v) for s, v in values.items()})


def check_train(args: argparse.Namespace) -> None:

    try:
        settings = build_settings(args)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from e
    args.settings = settings
    if settings.run.time_budget and "train__steps" in vars(args):
        raise UsageError("--time-budget plans the number of steps; pass --time-budget or --steps, not both")
    if not settings.data.sources and not settings.data.self_prompts:
        raise UsageError(
            "no training data; pass --data FILE_OR_DATASET (JSON/JSONL/TXT file or hub dataset name) "
            "or --self-prompts N (the target writes N prompts)"
        )
    for source in settings.data.sources:
        path = Path(source).expanduser()
        if path.suffix in (".json", ".jsonl", ".txt") and not path.is_file():
            raise UsageError(f"--data {source}: file not found")
    check_model_arg(settings.run.model)
    out = Path(settings.run.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    try:
        check_work_dir(settings.run)
    except ValueError as e:
        raise UsageError(str(e)) from e


def run_train(args: argparse.Namespace) -> int:
    from selfspec.training.pipeline import run

    summary = run(args.settings)
    if summary:
        print(json.dumps({k: summary[k] for k in ("out", "kind", "tau_calibrated_tree", "wall_s")}))
    return 0


# ------------------------------------------------------------------------------------- export
def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help=COMMANDS["export"][2],
        description="Export a selfspec drafter: --format eagle (eagle drafters; EAGLE-1 layout: vLLM method=eagle, "
        "SGLang EAGLE), eagle3 (eagle3 drafters, from `selfspec train --kind eagle3`; vLLM method=eagle3, SGLang "
        "EAGLE3), medusa (medusa drafters; vLLM method=medusa).",
    )
    p.add_argument("--drafter", required=True, help="'default' or a directory written by selfspec train")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="checkpoint layout")
    p.add_argument("--out", required=True, type=Path, help="output directory (replaced atomically)")
    p.add_argument(
        "--engine",
        default="vllm",
        choices=ENGINES,
        help="engine whose config naming to use (default: %(default)s)",
    )
    p.add_argument(
        "--model", default="default", help="the target the drafter was trained for (default: %(default)s)"
    )
    p.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        help="stored dtype (default: the dtype of the drafter's own weights file, i.e. as trained and "
        "shipped; the target is loaded in fp32 for the export, so nothing is rounded on the way)",
    )
    p.add_argument(
        "--cost-ratio",
        type=float,
        default=0.1,
        help="cost of one drafted token relative to a verify step, for the recommended vLLM "
        "num_speculative_tokens (default: %(default)s, a GPU serving estimate; measure yours)",
    )
    p.add_argument(
        "--full-vocab",
        action="store_true",
        help="medusa: write the whole vocabulary's read-out instead of a token_map for the drafter's reduced "
        "vocabulary (vLLM 0.32 cannot load token_map; the heads then propose over all tokens)",
    )
    p.set_defaults(run=run_export, check=check_export)


def check_export(args: argparse.Namespace) -> None:
    from selfspec.drafters.base import read_drafter_config
    from selfspec.models import resolve_drafter_dir
    from selfspec.training.exporter import check_format

    try:
        meta = read_drafter_config(resolve_drafter_dir(args.drafter))
        check_format(meta["kind"], args.format, args.engine)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e
    check_model_arg(args.model)
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a directory")
    if not 0 <= args.cost_ratio < 10:
        raise UsageError(f"--cost-ratio must be in [0, 10), got {args.cost_ratio}")


def run_export(args: argparse.Namespace) -> int:
    import selfspec
    from selfspec.models import resolve_drafter_dir
    from selfspec.training.exporter import MEDUSA_TOKEN_MAP_NOTE, command_lines, export, stored_dtype

    dtype = args.dtype or stored_dtype(resolve_drafter_dir(args.drafter))
    model, _ = selfspec.load_target(args.model, dtype="float32", device="cpu")  # fp16/bf16 -> fp32 is exact
    drafter = selfspec.load_drafter(args.drafter, model)
    out = export(drafter, model, args.format, args.out, args.engine, dtype, args.cost_ratio, args.full_vocab)
    note = json.loads((out / "selfspec_export.json").read_text())
    rec = note["recommended"]
    print(
        f"exported {drafter.kind} drafter as {args.format} ({args.engine}, {dtype or 'as loaded'}) to {out}"
    )
    print(
        f"recommended (from {rec['acceptance_source']}; top-1 acceptance by depth "
        f"{rec['top1_acceptance_by_depth']}): vLLM num_speculative_tokens {rec['vllm']['num_speculative_tokens']} "
        f"(expected {rec['vllm']['expected_tokens_per_step']} tokens per step at cost ratio {rec['cost_ratio']})"
    )
    target = _serve_target(args.model, model)
    for line in command_lines(args.format, target, out.resolve(), rec):
        print(line)
    if args.format == "medusa" and drafter.draft_ids is not None and not args.full_vocab:
        print(f"note: {MEDUSA_TOKEN_MAP_NOTE}; for vLLM 0.32 export with --full-vocab")
    return 0


def _serve_target(name: str, model: Any) -> str:
    """What to pass engines as the target: the hub id or directory given, or the converted
    default model's directory."""
    if name != "default":
        return name
    return getattr(model.config, "_name_or_path", "") or name
