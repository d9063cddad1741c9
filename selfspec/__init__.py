"""selfspec: lossless self-speculative decoding for Hugging Face causal LMs.

model, tokenizer = selfspec.load_target("default")
drafter = selfspec.load_drafter("default", model)      # or selfspec.new_drafter("eagle", model)
result = selfspec.generate(model, input_ids, drafter=drafter, max_new_tokens=128)
result.sequences, result.stats.mean_accepted_length, result.stats.tokens_per_s

The names below are imported on first use (PEP 562), so ``import selfspec`` and the command line's
``--help`` do not load torch and transformers; ``selfspec.generate`` is the same function either way.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_HOME = {
    "Drafter": "selfspec.drafters",
    "EagleDrafter": "selfspec.drafters",
    "MedusaDrafter": "selfspec.drafters",
    "GenerationResult": "selfspec.decoding",
    "Stats": "selfspec.decoding",
    "generate": "selfspec.decoding",
    "Features": "selfspec.hf",
    "target_features": "selfspec.hf",
    "load_drafter": "selfspec.models",
    "load_target": "selfspec.models",
    "new_drafter": "selfspec.models",
    "TreeBuffers": "selfspec.tree",
    "build_tree": "selfspec.tree",
    "chain": "selfspec.tree",
    "tree_from_parents": "selfspec.tree",
}

__all__ = [  # = sorted(_HOME) (a test keeps them equal)
    "Drafter",
    "EagleDrafter",
    "Features",
    "GenerationResult",
    "MedusaDrafter",
    "Stats",
    "TreeBuffers",
    "build_tree",
    "chain",
    "generate",
    "load_drafter",
    "load_target",
    "new_drafter",
    "target_features",
    "tree_from_parents",
]

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from selfspec.decoding import GenerationResult, Stats, generate
    from selfspec.drafters import Drafter, EagleDrafter, MedusaDrafter
    from selfspec.hf import Features, target_features
    from selfspec.models import load_drafter, load_target, new_drafter
    from selfspec.tree import TreeBuffers, build_tree, chain, tree_from_parents


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'selfspec' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
