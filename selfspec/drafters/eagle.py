"""EAGLE-style drafter: one decoder layer that extrapolates the target's features.

At position t the drafter reads ``fc([h_t ; embed(x_{t+1})])`` -- the target's hidden state and
the token that followed it -- runs one transformer layer of its own (causal, with its own KV
cache) and outputs a predicted feature for t+1, which the target's frozen, shared ``lm_head``
turns into a distribution over x_{t+2}. Drafting a tree is autoregressive at the feature level:
a node at depth d pairs its parent's predicted feature with its own token, one layer forward per
depth, each node attending to the cached prefix and its ancestors only.

The layer (RMSNorm, GQA attention with rotary positions, SwiGLU MLP) is written here from the
standard recipe; it does not depend on the target's modeling code, so any target works.

``Eagle3Drafter`` (kind "eagle3") is the EAGLE-3 layout: at the root it reads several target
layers (a low, a middle and a high one) fused by ``fc`` into one H-wide state g; its layer
normalizes the token embedding and g separately and attends over both (2H-wide q/k/v) with g as
the residual; deeper nodes read the layer's own (pre-norm) output as g; a final norm precedes the
read-out. It trains on tokens only (no feature regression) and exports to the EAGLE-3 layout
vLLM and SGLang load (``selfspec export --format eagle3``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from selfspec.attention import offset_causal_mask
from selfspec.cache import KVStore
from selfspec.drafters.base import Draft, Drafter, DrafterConfig, SharedModules
from selfspec.sampling import CandidateSampler
from selfspec.tree import (
    DraftPool,
    DynamicTree,
    TreeBuffers,
    grow_tree,
    prior_acceptance,
    sample_children,
    tree_from_acceptance,
)


@dataclass
class EagleConfig(DrafterConfig):
    num_heads: int = dataclasses.field(default=8, metadata={"help": "attention heads of the draft layer"})
    num_kv_heads: int = dataclasses.field(
        default=8, metadata={"help": "key/value heads (GQA) of the draft layer"}
    )
    head_dim: int = dataclasses.field(default=64, metadata={"help": "per-head size"})
    intermediate_size: int = dataclasses.field(default=1024, metadata={"help": "SwiGLU MLP width"})
    rms_norm_eps: float = dataclasses.field(default=1e-6, metadata={"help": "RMSNorm epsilon"})
    rope_theta: float = dataclasses.field(default=10000.0, metadata={"help": "rotary base"})
    tree_depth: int = dataclasses.field(default=5, metadata={"help": "depth of the default tree"})
    tree_nodes: int = dataclasses.field(
        default=24, metadata={"help": "nodes of the default tree, root included"}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary positions, got {self.head_dim}")
        if self.tree_depth < 1 or self.tree_nodes < 1:
            raise ValueError(
                f"tree_depth and tree_nodes must be >= 1, got {self.tree_depth}, {self.tree_nodes}"
            )


def default_feature_layers(num_layers: int) -> list[int]:
    """EAGLE-3's low, middle and high target layers, as the serving engines pick them by default
    (vLLM/SGLang aux hidden-state ids 2, L // 2, L - 3: the input to that layer, which is
    transformers' ``hidden_states[i]``)."""
    return [min(2, num_layers), num_layers // 2, max(num_layers - 3, 0)]


@dataclass
class Eagle3Config(EagleConfig):
    feature_layers: list[int] = dataclasses.field(
        default_factory=list,
        metadata={
            "help": "target hidden states fused at the root (indices into hidden_states: 0 = embeddings, "
            "i = output of layer i); default: a low, a middle and a high layer"
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.feature_layers:
            raise ValueError("feature_layers must name at least one target layer (EAGLE-3 uses three)")
        self.feature_layers = [int(i) for i in self.feature_layers]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (rotate-half form). x: [heads, N, D]; positions: [N]."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * inv_freq[None, :]  # [N, D/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class DraftLayer(nn.Module):
    """Pre-norm decoder layer whose attention reads and writes a one-layer ``KVStore``."""

    attention_width = 1  # q/k/v read this many H-wide vectors per row

    def __init__(self, c: EagleConfig):
        super().__init__()
        self.c = c
        width = self.attention_width * c.hidden_size
        self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.q_proj = nn.Linear(width, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(width, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(width, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.post_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # [N, H]
        positions: torch.Tensor,  # [N]
        store: KVStore | None = None,  # None: attend causally within x only (training)
        offset: int = 0,  # rows past the store's committed length where x's K/V go
        mask: torch.Tensor | None = None,  # [N, kv] bool; None = causal after the prefix
    ) -> torch.Tensor:
        n, c = x.shape[0], self.c
        h = self.attention_input(x)
        q = rotate(self.q_proj(h).view(n, c.num_heads, c.head_dim).transpose(0, 1), positions, c.rope_theta)
        k = rotate(
            self.k_proj(h).view(n, c.num_kv_heads, c.head_dim).transpose(0, 1), positions, c.rope_theta
        )
        v = self.v_proj(h).view(n, c.num_kv_heads, c.head_dim).transpose(0, 1)
        if store is not None:
            k, v = (t[0] for t in store.write(0, k[None], v[None], offset))  # [Hkv, S, D]
        if mask is None:
            mask = offset_causal_mask(n, k.shape[1], x.device)
        attn = F.scaled_dot_product_attention(
            q[None], k[None], v[None], attn_mask=mask[None, None], enable_gqa=True
        )
        x = self.residual(x) + self.o_proj(attn[0].transpose(0, 1).reshape(n, -1))
        h = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_norm(x)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FusedDraftLayer(DraftLayer):
    """EAGLE-3's layer. Its input row is ``[g ; e]`` (state, token embedding); attention reads
    ``[input_norm(e) ; hidden_norm(g)]`` through 2H-wide q/k/v and adds to g, the residual."""

    attention_width = 2

    def __init__(self, c: EagleConfig):
        super().__init__(c)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c.hidden_size
        return torch.cat([self.input_norm(x[:, h:]), self.hidden_norm(x[:, :h])], -1)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : self.c.hidden_size]


class EagleDrafter(Drafter):
    kind = "eagle"
    config_class = EagleConfig
    layer_class = DraftLayer
    regresses_features = True  # trained to predict the target's next feature (EAGLE-1)

    def __init__(self, config: EagleConfig, shared: SharedModules):
        super().__init__(config, shared)
        self.fc = nn.Linear(self.fc_inputs * config.hidden_size, config.hidden_size, bias=False)
        self.layer = self.layer_class(config)

    @property
    def fc_inputs(self) -> int:
        return 2  # fc([h ; e])

    def lift(self, features: torch.Tensor) -> torch.Tensor:
        """Target features as the root step reads them (EAGLE-1: the last hidden state itself)."""
        return features

    def default_paths(self) -> list[tuple[int, ...]]:
        prior = prior_acceptance(self.config.tree_depth, top_k=8, first=0.7, decay=0.85)
        return tree_from_acceptance(prior, self.config.tree_nodes).paths()

    def begin(self, max_len: int) -> KVStore:
        c = self.config
        p = self.fc.weight
        return KVStore(1, c.num_kv_heads, c.head_dim, max_len, dtype=p.dtype, device=p.device)

    def step_input(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[N, H] target (or predicted) features + [N] next tokens -> [N, H] layer input."""
        return self.fc(
            torch.cat([hidden.to(self.fc.weight.dtype), self.embed(tokens).to(self.fc.weight.dtype)], -1)
        )

    def step(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        store: KVStore | None = None,
        offset: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One draft step (the decoder layer) over input rows ``x``: see ``TrainableStep.step``."""
        return self.layer(x, positions, store, offset=offset, mask=mask)

    def forward(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced features for a whole sequence (training): [N, H], [N] -> [N, H]."""
        positions = torch.arange(hidden.shape[0], device=hidden.device)
        return self.step(self.step_input(self.lift(hidden), next_tokens), positions)

    def propose(
        self,
        state: KVStore,
        hidden: torch.Tensor,
        next_tokens: torch.Tensor,
        tree: TreeBuffers | DynamicTree,
        sampler: CandidateSampler | None = None,
    ) -> Draft:
        n = hidden.shape[0]
        positions = torch.arange(state.length, state.length + n, device=hidden.device)
        feats = self.step(self.step_input(self.lift(hidden), next_tokens), positions, state)  # [n, H]
        state.commit(torch.arange(n))
        if isinstance(tree, DynamicTree):
            return self._draft_dynamic(state, feats[-1], next_tokens[-1], tree, sampler)
        return self._draft_tree(state, feats[-1], next_tokens[-1], tree, sampler)

    def _draft_dynamic(
        self,
        state: KVStore,
        root_feat: torch.Tensor,
        root_token: torch.Tensor,
        spec: DynamicTree,
        sampler: CandidateSampler | None,
    ) -> Draft:
        """EAGLE-2: expand the most confident nodes level by level, verify the best ``budget``.
        Sampled: each level's node quota (the calibrated tree's depth profile) is spread over the
        frontier before its children are drawn (``grow_sampled_tree``)."""
        expander = _DynamicExpander(self, state, root_feat, spec)
        if sampler is None:
            tree, tokens = grow_tree(root_token, expander, spec.depth, spec.expand, spec.budget)
            return Draft(tree=tree, tokens=tokens)
        return self.grow_sampled(root_token, expander.sampled(sampler), spec, spec.depth, sampler)

    def _draft_tree(
        self,
        state: KVStore,
        root_feat: torch.Tensor,
        root_token: torch.Tensor,
        tree: TreeBuffers,
        sampler: CandidateSampler | None = None,
    ) -> Draft:
        """Fill the tree depth by depth; nodes must be ordered by depth (build_tree does so)."""
        t = tree.size
        feats = root_feat.new_zeros(t, root_feat.shape[-1])  # [T, H] predicted feature per node
        feats[0] = root_feat
        tokens = torch.empty(t, dtype=torch.long, device=root_feat.device)
        tokens[0] = root_token
        probs = (
            None if sampler is None else root_feat.new_zeros(t, self.config.vocab_size, dtype=torch.float32)
        )
        bounds = tree.level_bounds  # nodes of depth d: bounds[d]:bounds[d+1]
        base = state.length - 1  # position of the root (the bonus token's pair)
        for d in range(1, len(bounds) - 1):
            lo, hi, plo = bounds[d], bounds[d + 1], bounds[d - 1]
            parents = tree.parents[lo:hi]
            if sampler is None:
                top = self.top_candidates(feats[plo:lo], t)[1]  # [n_{d-1}, t] token ids, best first
                tokens[lo:hi] = top[parents - plo, tree.ranks[lo:hi]]
            else:
                q, logits = self.candidate_distribution(feats[plo:lo], sampler)  # [n_{d-1}, Vd]
                tokens[lo:hi], probs[lo:hi] = sample_children(
                    tree, lo, hi, q, plo, sampler.generator, logits, self.draft_vocab
                )
            if hi < t:  # deeper nodes need these nodes' features
                mask = torch.cat(
                    [tree.ancestor_mask.new_ones(hi - lo, state.length), tree.ancestor_mask[lo:hi, 1:hi]], 1
                )
                x = self.step_input(feats[parents], tokens[lo:hi])
                pos = torch.full((hi - lo,), base + d, device=x.device)
                feats[lo:hi] = self.step(x, pos, state, offset=lo - 1, mask=mask)
        return Draft(tree=tree, tokens=tokens, probs=probs)


class Eagle3Drafter(EagleDrafter):
    kind = "eagle3"
    config_class = Eagle3Config
    layer_class = FusedDraftLayer
    regresses_features = False  # EAGLE-3 trains on tokens only

    def __init__(self, config: Eagle3Config, shared: SharedModules):
        super().__init__(config, shared)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def fc_inputs(self) -> int:
        return len(self.config.feature_layers)  # fc(concat of the fused target layers)

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return tuple(self.config.feature_layers)

    def lift(self, features: torch.Tensor) -> torch.Tensor:
        """[N, len(feature_layers) * H] fused target layers -> [N, H] state g."""
        return self.fc(features.to(self.fc.weight.dtype))

    def step_input(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[N, H] state g + [N] tokens -> [N, 2H] layer input ``[g ; e]``."""
        dtype = self.fc.weight.dtype
        return torch.cat([hidden.to(dtype), self.embed(tokens).to(dtype)], -1)

    def draft_logits(self, h: torch.Tensor) -> torch.Tensor:
        return super().draft_logits(self.norm(h))


class _DynamicExpander:
    """The ``Proposer`` of one dynamic step: runs the draft layer on each new frontier.

    Frontier nodes get their K/V written contiguously after the drafter's committed rows (in the
    order they are expanded); each attends to the committed rows and to its expanded ancestors.
    """

    def __init__(self, drafter: EagleDrafter, state: KVStore, root_feat: torch.Tensor, spec: DynamicTree):
        self.d, self.state, self.spec = drafter, state, spec
        n = max(spec.pool_size, spec.budget)  # a sampled tree's pool is at most its budget
        self.feats = root_feat.new_zeros(n, root_feat.shape[-1])  # [N, H] predicted feature per pool node
        self.feats[0] = root_feat
        self.row = torch.full((n,), -1, dtype=torch.long, device=root_feat.device)  # pool node -> KV row
        self.anc = torch.zeros(n, 1 + spec.depth * spec.expand, dtype=torch.bool, device=root_feat.device)
        self.rows = 0  # rows written past the committed ones
        self.base = state.length - 1  # position of the root's pair

    def __call__(
        self, pool: DraftPool, frontier: torch.Tensor, level: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if level > 0:
            self._forward(pool, frontier, level)
        return self.d.top_candidates(self.feats[frontier], self.spec.top_k)  # [F, K] each

    def sampled(self, sampler: CandidateSampler):
        """The ``LevelProbs`` of a sampled tree: the drafter's warped distribution at the frontier."""

        def level_probs(pool: DraftPool, frontier: torch.Tensor, level: int) -> torch.Tensor:
            if level > 0:
                self._forward(pool, frontier, level)
            return self.d.candidate_distribution(self.feats[frontier], sampler)[0]  # [F, V]

        return level_probs

    def _forward(self, pool: DraftPool, frontier: torch.Tensor, level: int) -> None:
        f, parents = frontier.numel(), pool.parents[frontier]
        rows = torch.arange(self.rows, self.rows + f, device=frontier.device)
        self.row[frontier] = rows
        self.anc[frontier] = self.anc[parents]  # ancestors' rows (the root has none here)
        self.anc[frontier, rows] = True
        width = self.rows + f
        mask = torch.cat([self.anc.new_ones(f, self.state.length), self.anc[frontier, :width]], 1)
        x = self.d.step_input(self.feats[parents], pool.tokens[frontier])
        pos = torch.full((f,), self.base + level, device=x.device)
        self.feats[frontier] = self.d.step(x, pos, self.state, offset=self.rows, mask=mask)
        self.rows = width
