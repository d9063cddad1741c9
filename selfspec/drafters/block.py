"""Block drafter: every depth of the draft in one forward of one decoder layer (parallel drafting).

The EAGLE-3 drafter takes one layer forward per tree depth, each reading the tokens drafted above.
A block drafter (kind "block", after the parallel drafting of PARD, P-EAGLE and DFlash) reads the
same inputs -- the fused low/middle/high target layers ``g`` and the next token, one row per
committed position -- and appends ``block_depths - 1`` learned rows, one per further depth, at the
next positions. One causal forward over ``[context rows ; depth rows]`` gives the depth-1 state at
the last context row and the depth-(j+1) state at depth row j; the target's ``lm_head`` reads them
all at once. Depth rows attend to the whole committed context and to the depth rows before them;
their K/V are never committed (the next call's context rows overwrite them).

Like Medusa heads, the candidates of depth d do not depend on the tokens drafted above them, so
trees take depth d's candidate of a node's rank (``Drafter.propose_per_depth``). What a depth
sees is richer than a Medusa head's single state: attention over the drafter's whole cache of
fused target layers. The layer is EAGLE-3's (``FusedDraftLayer``); training scores depth row j of
anchor t against the target's distribution of token t+2+j, all depths in one forward
(``selfspec.training.objectives.BlockObjective``). No serving engine loads this layout;
``selfspec export`` refuses it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from selfspec.cache import KVStore
from selfspec.drafters.base import Draft, Drafter, SharedModules
from selfspec.drafters.eagle import Eagle3Config, FusedDraftLayer, RMSNorm
from selfspec.sampling import CandidateSampler
from selfspec.tree import DynamicTree, TreeBuffers, prior_acceptance, tree_from_acceptance


@dataclass
class BlockConfig(Eagle3Config):
    block_depths: int = dataclasses.field(
        default=4, metadata={"help": "depths drafted by one forward (the deepest tree level)"}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.block_depths < 1:
            raise ValueError(f"block_depths must be >= 1, got {self.block_depths}")


class BlockDrafter(Drafter):
    kind = "block"
    config_class = BlockConfig

    def __init__(self, config: BlockConfig, shared: SharedModules):
        super().__init__(config, shared)
        h = config.hidden_size
        self.fc = nn.Linear(len(config.feature_layers) * h, h, bias=False)
        self.layer = FusedDraftLayer(config)
        self.norm = RMSNorm(h, config.rms_norm_eps)
        # Row [g ; e] of depth j + 2 (j = 0 .. block_depths - 2): a learned state and embedding.
        self.depth_rows = nn.Parameter(torch.randn(config.block_depths - 1, 2 * h) * 0.02)

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return tuple(self.config.feature_layers)

    @property
    def block_depths(self) -> int:
        return self.config.block_depths

    def default_paths(self) -> list[tuple[int, ...]]:
        prior = prior_acceptance(self.config.block_depths, top_k=8, first=0.6, decay=0.7)
        return tree_from_acceptance(prior, self.config.tree_nodes).paths()

    def begin(self, max_len: int) -> KVStore:
        """A KV store for ``max_len`` committed rows plus the depth rows written after them."""
        c, p = self.config, self.fc.weight
        rows = max_len + c.block_depths - 1
        return KVStore(1, c.num_kv_heads, c.head_dim, rows, dtype=p.dtype, device=p.device)

    # ------------------------------------------------------------- the TrainableBlock protocol
    def lift(self, features: torch.Tensor) -> torch.Tensor:
        """[N, len(feature_layers) * H] fused target layers -> [N, H] state g."""
        return self.fc(features.to(self.fc.weight.dtype))

    def context_input(self, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[N, H] state g + [N] next tokens -> [N, 2H] context rows ``[g ; e]``."""
        dtype = self.fc.weight.dtype
        return torch.cat([state.to(dtype), self.embed(tokens).to(dtype)], -1)

    def depth_input(self) -> torch.Tensor:
        """[block_depths - 1, 2H] the rows appended for depths 2 .. block_depths."""
        return self.depth_rows

    def step(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        store: KVStore | None = None,
        offset: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The decoder layer over rows ``x`` (context and depth rows): [N, H] output states."""
        return self.layer(x, positions, store, offset=offset, mask=mask)

    def draft_logits(self, h: torch.Tensor) -> torch.Tensor:
        return super().draft_logits(self.norm(h))

    # ----------------------------------------------------------------------------- drafting
    def block_states(self, state: KVStore, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """Commit the new context rows and return the [block_depths, H] states of depths 1.. ."""
        n, k, start = hidden.shape[0], self.config.block_depths, state.length
        x = torch.cat([self.context_input(self.lift(hidden), next_tokens), self.depth_input()])
        positions = torch.arange(start, start + n + k - 1, device=hidden.device)  # depth rows follow the root
        out = self.step(x, positions, state)  # causal: context rows never see depth rows
        state.commit(torch.arange(n))
        return out[n - 1 :]

    def propose(
        self,
        state: KVStore,
        hidden: torch.Tensor,
        next_tokens: torch.Tensor,
        tree: TreeBuffers | DynamicTree,
        sampler: CandidateSampler | None = None,
    ) -> Draft:
        return self.propose_per_depth(
            self.block_states(state, hidden, next_tokens), next_tokens[-1], tree, sampler
        )
