"""Acceptance rules: which drafted path the target agrees with, and the target's own next token.

Given the target's logits at every tree node (one verify forward), a rule returns the accepted
path (node indices, root first) and a bonus token drawn from the target at the path's end. The
bonus is always the target's own token, so every step makes progress even when no draft is kept.

Greedy: a child is correct when its token equals the target's argmax at its parent; the longest
all-correct root path wins. The output is then exactly the target's greedy decoding.

torch only; no models, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfspec.tree import TreeBuffers


@dataclass(frozen=True)
class Acceptance:
    """Result of one verify step."""

    path: torch.Tensor  # [n] int64, accepted node indices, root first (n >= 1: the root is always kept)
    bonus: torch.Tensor  # [] int64, the target's token after the last accepted node


def greedy_accept(logits: torch.Tensor, tokens: torch.Tensor, tree: TreeBuffers) -> Acceptance:
    """Longest root path whose every drafted token is the target's argmax at its parent.

    logits: [T, V] target logits at each node; tokens: [T] node tokens (tokens[0] is the root).
    Vectorized over nodes; no host sync.
    """
    pred = logits.argmax(-1)  # [T]
    correct = tokens == pred[tree.parents.clamp(min=0)]  # [T]
    correct[0] = True
    all_ok = ~(tree.ancestor_mask & ~correct[None, :]).any(1)  # [T] every ancestor correct too
    best = torch.where(all_ok, tree.depths, -1).argmax()  # deepest accepted node; first on ties
    path = tree.ancestor_mask[best].nonzero().flatten()
    return Acceptance(path=path, bonus=pred[best])
