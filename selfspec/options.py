"""What the command lines, the eval and training share, as library API: input errors, exit codes,
the command table, the decoding options' parsing and help texts, and how a drafter is picked by
name. Standard library only at import time, so ``selfspec --help`` loads nothing heavy."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1

# name -> (module, function that adds its parser, one-line help); a command's module is imported
# only when that command runs (or for the full parser), so --help and generate stay light
COMMANDS: dict[str, tuple[str, str, str]] = {
    "generate": ("selfspec.cli", "add_generate", "generate text with speculative decoding"),
    "train": ("selfspec.training.cli", "add_train", "train a drafter on a frozen target"),
    "export": (
        "selfspec.training.cli",
        "add_export",
        "write a trained drafter in the layout vLLM / SGLang load",
    ),
    "eval": (
        "selfspec.eval.cli",
        "add_eval",
        "benchmark decoding methods on MT-bench / Spec-Bench question files",
    ),
}

# The drafter kinds by name (their classes: selfspec.drafters.KINDS, built from this list), here so
# that flags and configs can name them without importing torch.
DRAFTER_KINDS = ("medusa", "eagle", "eagle3", "block")


class UsageError(ValueError):
    """Bad command-line input, caught before any model is loaded."""


VERIFY_HELP = "'exact' (default): every tree node computes bitwise what a one-token step computes, so greedy output is bitwise the model's own in any dtype; 'batched': one masked pass per tree, cheaper on a CPU, equal to plain decoding only up to floating-point near-ties"
CANDIDATES_HELP = (
    "how the drafter proposes when sampling (temperature > 0): 'top-k' (its most likely tokens), "
    "'sampled' (drawn from its distribution, warped as the model's; keeps more tokens per step at "
    "high temperatures) or 'auto' (the one measured better at the temperature); lossless either "
    "way, and greedy decoding always uses top-k"
)
TREE_HELP = (
    "draft tree: 'static' (the drafter's calibrated tree), 'dynamic' (grown each step from the "
    "drafter's confidence), N (dynamic with N nodes; 1 = no drafting), or 'auto' (the size measured "
    "fastest on this device, cached; may be 1 where drafting does not pay)"
)


def parse_tree(value: Any) -> str | int:
    """A --tree value as generate(tree=...) takes it: 'static' | 'dynamic' | 'auto' | node count."""
    if value in ("static", "dynamic", "auto"):
        return value
    if not str(value).isdigit() or int(value) < 1:
        raise ValueError(f"--tree {value!r} must be static, dynamic, auto or a positive node count")
    return int(value)


def check_model_arg(model: str) -> None:
    """Refuse a --model value that cannot name a model (UsageError), before loading anything."""
    from selfspec.models import HUB_ID

    path = Path(model).expanduser()
    if model == "default" or path.is_dir() or (path.suffix == ".gguf" and path.is_file()):
        return
    if path.suffix == ".gguf":
        raise UsageError(f"--model {model}: GGUF file not found")
    if not HUB_ID.match(model) or path.exists():
        raise UsageError(
            f"--model {model!r} is neither 'default', a .gguf file, a local directory, nor a hub id"
        )


def pick_drafter(name: str, model: Any, quiet: bool = False):
    """'none' -> None; 'default' -> the shipped drafter if this build has one, else None."""
    import selfspec
    from selfspec.models import resolve_drafter_dir

    if name == "none":
        return None
    if name == "default":
        try:
            resolve_drafter_dir("default")
        except FileNotFoundError:
            if not quiet:
                print("selfspec: no default drafter shipped; decoding without one", file=sys.stderr)
            return None
        try:
            return selfspec.load_drafter(name, model)
        except ValueError as e:  # another target: say why 'default' (also the flag's default) cannot apply
            why = str(e).split(";")[0].replace(f"drafter at {resolve_drafter_dir('default')} ", "it ")
            raise ValueError(
                f"--drafter default is the drafter shipped for the default model (SmolLM2-135M-"
                f"Instruct) and {why}; pass --drafter none, or a drafter trained for this model "
                "(selfspec train --model ...)"
            ) from e
    return selfspec.load_drafter(name, model)
