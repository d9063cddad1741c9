"""Medusa-style drafter: K parallel heads on the target's last hidden state.

Head k maps the hidden state h_t (whose own ``lm_head`` gives token t+1, the bonus) through a
small stack of residual blocks and reads the result with the target's frozen, shared ``lm_head``,
predicting token t+2+k. Heads do not see each other's choices, so a tree node at depth d simply
takes head d-1's candidate of its rank. Blocks start as the identity (zero weights, as in the
Medusa paper), so an untrained head predicts the bonus token again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selfspec.drafters.base import Draft, Drafter, DrafterConfig, SharedModules
from selfspec.sampling import CandidateSampler
from selfspec.tree import DynamicTree, TreeBuffers, prior_acceptance, tree_from_acceptance


@dataclass
class MedusaConfig(DrafterConfig):
    num_heads: int = dataclasses.field(default=4, metadata={"help": "heads = deepest tree level drafted"})
    num_layers: int = dataclasses.field(default=1, metadata={"help": "residual blocks per head"})
    tree_nodes: int = dataclasses.field(
        default=24, metadata={"help": "nodes of the default tree, root included"}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.num_heads < 1 or self.num_layers < 1:
            raise ValueError(
                f"num_heads and num_layers must be >= 1, got {self.num_heads} and {self.num_layers}"
            )
        if self.tree_nodes < 1:
            raise ValueError(f"tree_nodes must be >= 1 (the root), got {self.tree_nodes}")


class ResBlock(nn.Module):
    """x + SiLU(W x + b), W initialised to zero so the block starts as the identity."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class MedusaDrafter(Drafter):
    kind = "medusa"
    config_class = MedusaConfig

    def __init__(self, config: MedusaConfig, shared: SharedModules):
        super().__init__(config, shared)
        self.heads = nn.ModuleList(
            nn.Sequential(*(ResBlock(config.hidden_size) for _ in range(config.num_layers)))
            for _ in range(config.num_heads)
        )

    def default_paths(self) -> list[tuple[int, ...]]:
        prior = prior_acceptance(self.config.num_heads, top_k=8, first=0.6, decay=0.7)
        return tree_from_acceptance(prior, self.config.tree_nodes).paths()

    def depth_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, K, H]: each head's transformed state (read with the shared lm_head)."""
        return torch.stack([head(hidden) for head in self.heads], dim=1)

    def propose(
        self,
        state: Any,
        hidden: torch.Tensor,
        next_tokens: torch.Tensor,
        tree: TreeBuffers | DynamicTree,
        sampler: CandidateSampler | None = None,
    ) -> Draft:
        if isinstance(tree, TreeBuffers) and tree.max_depth > len(self.heads):
            raise ValueError(f"tree depth {tree.max_depth} exceeds the {len(self.heads)} Medusa heads")
        return self.propose_per_depth(self.depth_states(hidden[-1:])[0], next_tokens[-1], tree, sampler)
