"""selfspec: lossless self-speculative decoding for Hugging Face causal LMs.

model, tokenizer = selfspec.load_target("default")
drafter = selfspec.load_drafter("default", model)      # or selfspec.new_drafter("eagle", model)
result = selfspec.generate(model, input_ids, drafter=drafter, max_new_tokens=128)
result.sequences, result.stats.mean_accepted_length, result.stats.tokens_per_s
"""

from selfspec.drafters import Drafter, EagleDrafter, MedusaDrafter
from selfspec.generate import GenerationResult, Stats, generate
from selfspec.hf import Features, target_features
from selfspec.models import load_drafter, load_target, new_drafter
from selfspec.tree import TreeBuffers, build_tree, chain, tree_from_parents

__version__ = "0.1.0"

__all__ = [
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
