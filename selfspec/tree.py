"""Token trees as data.

A draft tree has T nodes. Node 0 is the root: the token the target produced last (its bonus
token), whose K/V is not in the cache yet. Every other node is a drafted token one position
deeper than its parent. The target scores all T nodes in one forward: node i sits at position
``prefix_len + depths[i]`` and attends to the whole prefix plus its own ancestors (itself
included), which is exactly ``ancestor_mask[i]``.

Everything here is torch only and has no notion of models: a tree is built once from its shape
(static trees) or per step from parent indices (dynamic trees), and the buffers travel to the
attention kernels, the acceptance rule and the cache commit unchanged.

The shape is given either as Medusa-style paths -- ``(0,)`` is the drafter's best candidate at
depth 1, ``(0, 1)`` the second-best candidate at depth 2 below it -- or as a parents array.
The last element of a path is the node's *rank*: which of the drafter's candidates at that depth
(conditioned on the parent for autoregressive drafters) the node takes.

Dynamic trees (EAGLE-2) are grown per step from the drafter's confidences: ``expand_frontier``
adds one depth to a ``DraftPool`` and picks the next frontier, ``select_nodes`` keeps the best
``budget`` nodes of the pool, and ``grow_tree`` drives both (``medusa_proposer`` adapts Medusa heads).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

Path = tuple[int, ...]


@dataclass(frozen=True)
class TreeBuffers:
    """Static description of one draft tree; T nodes, node 0 the root, parents before children."""

    parents: torch.Tensor  # [T] int64, parent node of each node; -1 for the root
    depths: torch.Tensor  # [T] int64, 0 for the root; node i sits at position prefix_len + depths[i]
    ranks: torch.Tensor  # [T] int64, candidate rank among the drafter's top-k at the node's depth; -1 root
    ancestor_mask: torch.Tensor  # [T, T] bool, [i, j] is True iff j is i or an ancestor of i
    retrieve_paths: torch.Tensor  # [P, D] int64, root-to-leaf node indices, right-padded with -1
    num_children: torch.Tensor  # [T] int64, children per node (0 for leaves)

    @property
    def size(self) -> int:
        """Number of nodes T, root included."""
        return int(self.parents.shape[0])

    @property
    def max_depth(self) -> int:
        """Depth of the deepest node (0 for a root-only tree)."""
        return int(self.retrieve_paths.shape[1]) - 1

    @cached_property
    def sibling_slots(self) -> torch.Tensor:
        """[T] int64: each node's place among its siblings in node order (0 for the root and first
        children). Sampled candidates are drawn in this order (``sample_children``)."""
        idx = torch.arange(self.size, device=self.parents.device)
        same_parent = (self.parents[:, None] == self.parents[None, :]) & (idx[None, :] < idx[:, None])
        return same_parent.sum(1)

    @cached_property
    def level_bounds(self) -> tuple[int, ...]:
        """Where each depth's nodes start, plus T: depth d is nodes ``[d]:[d+1]`` (nodes ordered by
        depth). Computed once per tree object, so static-tree drafting does no host sync per step."""
        return (0, *torch.bincount(self.depths).cumsum(0).tolist())

    def to(self, device: torch.device | str) -> TreeBuffers:
        """The same tree with every buffer on ``device``."""
        return TreeBuffers(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})

    def paths(self) -> list[Path]:
        """The Medusa-style paths (ranks from the root) of every non-root node, in node order."""
        out: list[Path] = [()]
        parents, ranks = self.parents.tolist(), self.ranks.tolist()
        for i in range(1, len(parents)):
            out.append(out[parents[i]] + (ranks[i],))
        return out[1:]


def tree_from_parents(
    parents: Sequence[int] | torch.Tensor, ranks: Sequence[int] | torch.Tensor | None = None
) -> TreeBuffers:
    """Build the buffers of a tree given each node's parent (``parents[0] == -1``, ``parents[i] < i``).

    ``ranks`` defaults to each node's order among its siblings. The work is vectorized over nodes
    (one pointer-jumping step per depth), so it can run every decode step for dynamic trees.
    """
    parents = torch.as_tensor(parents, dtype=torch.long)
    if parents.ndim != 1 or parents.numel() == 0:
        raise ValueError(f"parents must be a non-empty 1-D sequence, got shape {tuple(parents.shape)}")
    t = parents.numel()
    idx = torch.arange(t, device=parents.device)
    if parents[0].item() != -1:
        raise ValueError(f"node 0 must be the root (parents[0] == -1), got parents[0] == {parents[0].item()}")
    if t > 1 and not bool(((parents[1:] >= 0) & (parents[1:] < idx[1:])).all()):
        raise ValueError("every non-root node's parent must be an earlier node (0 <= parents[i] < i)")

    ancestor_mask = torch.zeros(t, t, dtype=torch.bool, device=parents.device)
    depths = torch.zeros(t, dtype=torch.long, device=parents.device)
    cur = idx.clone()
    alive = torch.ones(t, dtype=torch.bool, device=parents.device)
    while bool(alive.any()):
        ancestor_mask[idx[alive], cur[alive]] = True
        cur = torch.where(alive, parents[cur.clamp(min=0)], cur)
        alive = alive & (cur >= 0)
        depths += alive.long()

    num_children = torch.bincount(parents[1:], minlength=t) if t > 1 else torch.zeros(1, dtype=torch.long)
    if ranks is None:
        # Rank among siblings: how many earlier nodes share the same parent.
        same_parent = (parents[:, None] == parents[None, :]) & (idx[None, :] < idx[:, None])
        ranks = same_parent.sum(1)
        ranks[0] = -1
    ranks = torch.as_tensor(ranks, dtype=torch.long, device=parents.device)
    if ranks.shape != parents.shape:
        raise ValueError(
            f"ranks has shape {tuple(ranks.shape)}, expected {tuple(parents.shape)} (one per node)"
        )

    leaves = (num_children == 0).nonzero().flatten()
    width = int(depths.max().item()) + 1
    # Path of a leaf = its ancestors in index order (parents precede children, so index order is
    # depth order along a path).
    keyed = torch.where(ancestor_mask[leaves], idx, t).sort(dim=1).values[:, :width]
    retrieve_paths = torch.where(keyed == t, -1, keyed)
    return TreeBuffers(
        parents=parents,
        depths=depths,
        ranks=ranks,
        ancestor_mask=ancestor_mask,
        retrieve_paths=retrieve_paths,
        num_children=num_children,
    )


def build_tree(paths: Iterable[Sequence[int]]) -> TreeBuffers:
    """Build a static tree from Medusa-style paths; the root is implicit and comes first.

    Nodes are ordered by depth, then lexicographically, so parents always precede children.
    Every prefix of a path must itself be a path (a node cannot hang below a missing node).
    """
    uniq = sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p))
    for p in uniq:
        if len(p) == 0:
            raise ValueError("the empty path is the implicit root; list only non-root nodes")
        if min(p) < 0:
            raise ValueError(f"path {p} has a negative rank; ranks index the drafter's top-k candidates")
    index = {(): 0}
    parents, ranks = [-1], [-1]
    for p in uniq:
        if p[:-1] not in index:
            raise ValueError(f"path {p} needs its parent {p[:-1]} in the tree as well")
        index[p] = len(parents)
        parents.append(index[p[:-1]])
        ranks.append(p[-1])
    return tree_from_parents(parents, ranks)


def chain(depth: int) -> TreeBuffers:
    """A single path of ``depth`` drafted tokens (each the drafter's top-1), plus the root."""
    if depth < 0:
        raise ValueError(f"chain depth must be >= 0, got {depth}")
    return build_tree([(0,) * d for d in range(1, depth + 1)])


def expected_tau(acceptance: torch.Tensor, paths: Iterable[Sequence[int]]) -> float:
    """Expected tokens per step of the tree of ``paths`` (bonus counted): 1 + the sum over nodes of
    the product of ``acceptance[d, k]`` along each node's path (independence, as in Medusa)."""
    total = 1.0
    for path in paths:
        p = 1.0
        for d, k in enumerate(path):
            p *= float(acceptance[d, k])
        total += p
    return total


def tree_from_acceptance(acceptance: torch.Tensor, num_nodes: int) -> TreeBuffers:
    """The static tree of ``num_nodes`` nodes (root included) with the largest expected accepted length.

    ``acceptance[d, k]`` is the probability that the drafter's rank-k candidate at depth d+1 is the
    target's token (measured on held-out data, or a prior). Under independence a node's chance of
    being accepted is the product along its path, and the expected accepted length is the sum
    over nodes, so growing best-first from the root is optimal (Medusa's construction).
    """
    acc = torch.as_tensor(acceptance, dtype=torch.float64)
    if acc.ndim != 2 or acc.numel() == 0:
        raise ValueError(f"acceptance must be a [depth, top_k] matrix, got shape {tuple(acc.shape)}")
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1 (the root), got {num_nodes}")
    max_d, top_k = acc.shape
    chosen: list[Path] = []
    heap: list[tuple[float, Path]] = [(-float(acc[0, k]), (k,)) for k in range(top_k)]
    heapq.heapify(heap)
    while heap and len(chosen) < num_nodes - 1:
        neg_p, path = heapq.heappop(heap)
        chosen.append(path)
        if len(path) < max_d:
            for k in range(top_k):
                heapq.heappush(heap, (neg_p * float(acc[len(path), k]), path + (k,)))
    return build_tree(chosen)


def prior_acceptance(depth: int, top_k: int, first: float, decay: float) -> torch.Tensor:
    """A prior acceptance matrix [depth, top_k] for drafters not calibrated yet: rank k at depth d
    is accepted with ``first * decay**d / 2**k`` (top-1 dominates; deeper heads are weaker)."""
    d = torch.arange(depth, dtype=torch.float64)[:, None]
    k = torch.arange(top_k, dtype=torch.float64)[None, :]
    return first * decay**d / 2.0**k


# Dynamic trees (EAGLE-2). Each step the drafter grows a pool of candidates depth by depth:
# every frontier node proposes its top-k children, scored by cumulative log-confidence (the sum of
# drafter log-probs along the path, a stand-in for the chance that the whole path is accepted);
# the best `expand` children globally form the next frontier. Finally the best `budget` nodes of
# the whole pool are verified. Medusa heads fit the same mould: head d proposes the same top-k at
# every frontier node, independently of the parent.


@dataclass(frozen=True)
class DraftPool:
    """Every candidate drafted so far in one step, root first, parents before children."""

    tokens: torch.Tensor  # [N] int64, node tokens; tokens[0] is the root (the last bonus token)
    parents: torch.Tensor  # [N] int64, parent node; -1 for the root
    scores: torch.Tensor  # [N] float32, cumulative drafter log-prob of the path; 0 at the root
    ranks: torch.Tensor  # [N] int64, the node's rank in its parent's top-k; -1 for the root

    @staticmethod
    def root(token: int | torch.Tensor, device: torch.device | str | None = None) -> DraftPool:
        """A pool holding only the root."""
        token = torch.as_tensor(token, dtype=torch.long, device=device).reshape(1)
        return DraftPool(
            tokens=token,
            parents=torch.full_like(token, -1),
            scores=torch.zeros(1, dtype=torch.float32, device=token.device),
            ranks=torch.full_like(token, -1),
        )

    @property
    def size(self) -> int:
        """Number of nodes N, root included."""
        return int(self.parents.shape[0])


Proposer = Callable[[DraftPool, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""``propose(pool, frontier [F], depth) -> (logprobs [F, K] or [K], tokens [F, K] or [K])``: the
drafter's top-k children of each frontier node; ``depth`` (0-based) is the frontier's depth."""


def expand_frontier(
    pool: DraftPool, frontier: torch.Tensor, logprobs: torch.Tensor, tokens: torch.Tensor, expand: int
) -> tuple[DraftPool, torch.Tensor]:
    """Add the top-k children of every frontier node to the pool and pick the next frontier.

    frontier: [F] node indices into ``pool``; logprobs, tokens: [F, K] the drafter's top-k at each
    frontier node, or [K] for candidates that do not depend on the parent (Medusa heads). All F*K
    children join the pool; the ``expand`` best by cumulative score (earlier node on ties) are the
    next frontier, returned as ascending node indices [min(expand, F*K)] into the grown pool.
    """
    if expand < 1:
        raise ValueError(f"expand must be >= 1 (frontier nodes per depth), got {expand}")
    f = frontier.numel()
    logprobs = logprobs.expand(f, logprobs.shape[-1]) if logprobs.ndim == 1 else logprobs
    tokens = tokens.expand(f, tokens.shape[-1]) if tokens.ndim == 1 else tokens
    if logprobs.shape != tokens.shape or logprobs.shape[0] != f:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and tokens {tuple(tokens.shape)} must both be [F, K] (or [K]) "
            f"for the F={f} frontier nodes"
        )
    k = logprobs.shape[1]
    scores = (pool.scores[frontier][:, None] + logprobs.float()).flatten()  # [F*K]
    grown = DraftPool(
        tokens=torch.cat([pool.tokens, tokens.flatten().long()]),
        parents=torch.cat([pool.parents, frontier.long().repeat_interleave(k)]),
        scores=torch.cat([pool.scores, scores]),
        ranks=torch.cat([pool.ranks, torch.arange(k, device=scores.device).repeat(f)]),
    )
    best = scores.sort(descending=True, stable=True).indices[:expand]
    return grown, pool.size + best.sort().values


def select_nodes(
    parents: torch.Tensor, scores: torch.Tensor, budget: int, ranks: torch.Tensor | None = None
) -> tuple[TreeBuffers, torch.Tensor]:
    """The tree of the best ``budget`` nodes (root included) of a pool, and their pool indices.

    parents: [N] with parents[i] < i; scores: [N] cumulative scores; ranks: [N] or None (then
    sibling order). The root is always kept. A node ranks by the lowest score on its path, which
    is its own score whenever scores do not increase along paths (sums of log-probs); ties go to
    the earlier node. A parent thus always outranks its children, so the kept set holds every
    kept node's ancestors. Returns the TreeBuffers of the kept nodes re-indexed in pool order
    (parents still precede children) and kept [M] ascending pool indices, M = min(budget, N).
    """
    parents = torch.as_tensor(parents, dtype=torch.long)
    scores = torch.as_tensor(scores, device=parents.device)
    if budget < 1:
        raise ValueError(f"budget must be >= 1 (the root counts), got {budget}")
    if scores.shape != parents.shape or parents.ndim != 1:
        raise ValueError(f"parents {tuple(parents.shape)} and scores {tuple(scores.shape)} must both be [N]")
    if bool(scores.isnan().any()):
        raise ValueError("scores contain NaN; pass cumulative log-probs (use -inf for impossible nodes)")
    idx = torch.arange(parents.numel(), device=parents.device)
    if parents[0].item() != -1 or not bool(((parents[1:] >= 0) & (parents[1:] < idx[1:])).all()):
        raise ValueError(
            "node 0 must be the root (parents[0] == -1) and every other node's parent must be an earlier node"
        )
    rank_key = _path_min(parents, scores.double())
    rank_key[0] = torch.inf  # the root is always verified
    kept = rank_key.sort(descending=True, stable=True).indices[:budget].sort().values  # [M]
    new_index = torch.full_like(parents, -1)
    new_index[kept] = torch.arange(kept.numel(), device=parents.device)
    kept_parents = parents[kept]
    new_parents = torch.where(kept_parents < 0, -1, new_index[kept_parents.clamp(min=0)])
    tree = tree_from_parents(new_parents, None if ranks is None else torch.as_tensor(ranks)[kept])
    return tree, kept


def _path_min(parents: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Each node's lowest score over itself and its ancestors [N] (a loop over depth, not nodes)."""
    low = scores.clone()
    anc = parents.clone()  # [N] the ancestor compared next; -1 once past the root
    while bool((anc >= 0).any()):
        up = anc >= 0
        low = torch.where(up, torch.minimum(low, scores[anc.clamp(min=0)]), low)
        anc = torch.where(up, parents[anc.clamp(min=0)], anc)
    return low


def grow_tree(
    root_token: int | torch.Tensor, propose: Proposer, depth: int, expand: int, budget: int
) -> tuple[TreeBuffers, torch.Tensor]:
    """Grow a dynamic tree ``depth`` levels deep, then keep its best ``budget`` nodes.

    Each level calls ``propose(pool, frontier, level)`` for the drafter's top-k at the frontier
    (EAGLE: run the draft model on the frontier nodes; Medusa: ``medusa_proposer``) and keeps the
    ``expand`` best children as the next frontier. Returns the tree and its node tokens [T].
    """
    # Checked before any drafter call, which is where the time goes.
    for name, value, least in (("depth", depth, 0), ("expand", expand, 1), ("budget", budget, 1)):
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    pool = DraftPool.root(root_token)
    frontier = torch.zeros(1, dtype=torch.long, device=pool.tokens.device)
    for level in range(depth):
        logprobs, tokens = propose(pool, frontier, level)
        pool, frontier = expand_frontier(pool, frontier, logprobs, tokens, expand)
    tree, kept = select_nodes(pool.parents, pool.scores, budget, pool.ranks)
    return tree, pool.tokens[kept]


def medusa_proposer(head_logprobs: torch.Tensor, head_tokens: torch.Tensor) -> Proposer:
    """A proposer from Medusa heads' top-k, head_logprobs and head_tokens [D, K]: head d proposes
    the same candidates below every node at depth d, whatever the parent."""
    if head_logprobs.shape != head_tokens.shape or head_logprobs.ndim != 2:
        raise ValueError(
            f"head_logprobs {tuple(head_logprobs.shape)} and head_tokens {tuple(head_tokens.shape)} "
            "must both be [D, K]"
        )

    def propose(pool: DraftPool, frontier: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        if level >= head_logprobs.shape[0]:
            n = head_logprobs.shape[0]
            raise ValueError(f"there are {n} Medusa heads; grow at most that many levels")
        return head_logprobs[level], head_tokens[level]  # [K] each, broadcast over the frontier

    return propose


@dataclass(frozen=True)
class DynamicTree:
    """How to grow a per-step tree from the drafter's confidences (EAGLE-2 style)."""

    depth: int = 6  # levels drafted below the root
    top_k: int = 8  # children proposed per expanded node
    expand: int = 8  # frontier nodes expanded per level (best by cumulative log-prob)
    budget: int = 32  # nodes verified by the target, root included

    def __post_init__(self):
        for name, least in (("depth", 1), ("top_k", 1), ("expand", 1), ("budget", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"DynamicTree.{name} must be >= {least}, got {getattr(self, name)}")

    @classmethod
    def sized(cls, budget: int, depth: int = 6, top_k: int = 8, expand: int = 8) -> DynamicTree:
        """A tree of ``budget`` nodes that drafts no more than it can keep: a path holds at most
        budget - 1 drafted nodes, so depth, top-k and expand above that only add drafting work
        (which matters for small budgets on CPUs)."""
        if budget < 1:
            raise ValueError(f"DynamicTree.budget must be >= 1, got {budget}")
        cap = max(1, budget - 1)
        return cls(depth=min(depth, cap), top_k=min(top_k, cap), expand=min(expand, cap), budget=budget)

    @property
    def pool_size(self) -> int:
        """Nodes drafted before selection, root included."""
        return 1 + self.top_k + (self.depth - 1) * self.expand * self.top_k


# Sampled candidates (temperature > 0). Lossless rejection sampling over a tree accepts any
# proposal distribution q, provided each candidate really is drawn from the q it is tried with
# (``selfspec.accept.sample_accept``). Drawing a node's children from the drafter's warped
# distribution, siblings without replacement, makes q close to the target's own distribution,
# which is what keeps tau up at high temperatures where top-k candidates miss. The catch is that a
# node's existence may not depend on its own value (nor on later siblings' or descendants' values):
# EAGLE-2's "keep the best nodes of the pool" would keep a sampled token *because* it came out
# likely, and bias the output. So a sampled tree decides each node's number of children before
# drawing them, from what is already known (the parent's q and its path score); which drawn nodes
# get children of their own may depend on their values, as a longer draft may follow a confident
# token in plain speculative sampling.


def sample_without_replacement(
    probs: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
    fallback: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k distinct tokens per row of probs [F, V], in draw order: the first is drawn from the row,
    each next one from the row without the earlier ones, renormalized (Gumbel top-k, which is
    exactly that sequential draw). Returns tokens [F, k] and sampled [F, k] bool.

    Where a row has fewer than k tokens of positive probability (top-k / top-p warping, low
    temperature), the draw ends when they are used up and the remaining slots take deterministic
    fillers: the best tokens by ``fallback`` scores [F, V] (default: probs) not drawn yet. A filler
    is tried as a point mass (``sampled`` False), which the rejection rule allows after the
    sampled siblings.
    """
    v = probs.shape[-1]
    if not 1 <= k <= v:
        raise ValueError(f"k must be in [1, {v}] (the vocabulary), got {k}")
    u = torch.rand(probs.shape, generator=generator, device=probs.device).clamp(min=1e-20)
    keys = torch.where(probs > 0, probs.log() - (-u.log()).log(), -torch.inf)  # log q + Gumbel noise
    top = keys.topk(k, dim=-1)
    tokens, sampled = top.indices, top.values > -torch.inf
    if bool(sampled.all()):
        return tokens, sampled
    score = (probs if fallback is None else fallback).float().masked_fill(probs > 0, -torch.inf)
    fill = score.topk(k, dim=-1).indices  # [F, k] best tokens outside the support, best first
    # the j-th unsampled slot of a row takes that row's j-th filler
    nth = (~sampled).long().cumsum(-1) - 1
    tokens = torch.where(sampled, tokens, fill.gather(1, nth.clamp(min=0)))
    return tokens, sampled


def sample_children(
    tree: TreeBuffers,
    lo: int,
    hi: int,
    probs: torch.Tensor,
    first_parent: int,
    generator: torch.Generator | None = None,
    fallback: torch.Tensor | None = None,
    vocab: DraftVocab | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled tokens of a static tree's nodes ``lo:hi`` (one depth) and the distribution each was
    drawn from. probs [P, Vd]: the drafter's distribution at the parents, row r for node
    ``first_parent + r``; a node with sibling slot j takes its parent's j-th draw without
    replacement (``sample_without_replacement``; ``fallback`` [P, Vd] ranks fillers). Returns
    target tokens [hi - lo] and rows [hi - lo, V]: the parent's row, or a point mass for a filler
    (``vocab`` maps a reduced draft vocabulary's columns to the target's)."""
    parents = tree.parents[lo:hi] - first_parent
    slots = tree.sibling_slots[lo:hi]
    drawn, sampled = sample_without_replacement(probs, int(slots.max()) + 1, generator, fallback)
    tokens, was_sampled = drawn[parents, slots], sampled[parents, slots]
    point = torch.nn.functional.one_hot(tokens, probs.shape[-1]).to(probs.dtype)
    rows = torch.where(was_sampled[:, None], probs[parents], point)
    return (tokens, rows) if vocab is None else (vocab.ids[tokens], vocab.rows(rows))


@dataclass(frozen=True)
class DraftVocab:
    """A reduced draft vocabulary: column j of a drafter distribution is target token ``ids[j]``.
    Sampling works on the Vd draft columns (6x less than 49k for the default drafter) and only
    the rows handed to the rejection rule are spread over the target's ``size`` tokens."""

    ids: torch.Tensor  # [Vd] int64 target ids
    size: int  # the target vocabulary V

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """[n, Vd] -> [n, V], zeros outside the draft vocabulary."""
        full = rows.new_zeros(rows.shape[0], self.size)
        return full.scatter_(1, self.ids.expand(rows.shape[0], -1), rows)


LevelProbs = Callable[[DraftPool, torch.Tensor, int], torch.Tensor]
"""``level_probs(pool, frontier [F], level) -> probs [F, V] or [V]``: the drafter's warped
next-token distribution at each frontier node (or one for all, Medusa heads)."""


def grow_sampled_tree(
    root_token: int | torch.Tensor,
    level_probs: LevelProbs,
    quotas: Sequence[int],
    max_children: int,
    expand: int,
    generator: torch.Generator | None = None,
    vocab: DraftVocab | None = None,
) -> tuple[TreeBuffers, torch.Tensor, torch.Tensor]:
    """A dynamic tree of sampled candidates: ``quotas[d]`` nodes at depth d + 1.

    Each level first decides how many children every frontier node gets, from what is known before
    any of them is drawn: slot j of node v is worth v's path score plus the log of the j-th largest
    probability of v's distribution (at most ``max_children`` slots per node), and the level's
    quota goes to the best slots. Then each node's children are drawn from its distribution
    without replacement. The ``expand`` best drawn nodes by path score (the sampled tokens' log-
    probabilities summed) form the next frontier: deciding who gets children by a node's value is
    allowed, deciding whether it exists is not (see the comment above).

    Returns the tree, its tokens [T] and the distribution each node was drawn from [T, V] (row 0,
    the root, is zeros), as ``sample_accept`` takes them. With ``vocab`` the distributions are
    over a reduced draft vocabulary (columns ``vocab.ids``); tokens and rows come back in the
    target's.
    """
    if max_children < 1 or expand < 1:
        raise ValueError(f"max_children and expand must be >= 1, got {max_children} and {expand}")
    pool = DraftPool.root(root_token)
    frontier = torch.zeros(1, dtype=torch.long, device=pool.tokens.device)
    rows: list[torch.Tensor] = []
    for level, quota in enumerate(quotas):
        q = level_probs(pool, frontier, level)
        f = frontier.numel()
        q = q.expand(f, q.shape[-1]) if q.ndim == 1 else q  # [F, V]
        if not rows:
            rows.append(q.new_zeros(1, q.shape[-1]))  # the root was not drawn
        k = min(max_children, q.shape[-1])
        estimate = pool.scores[frontier][:, None] + q.topk(k, dim=-1).values.float().log()  # [F, k]
        n = min(int(quota), int(torch.isfinite(estimate).sum()))
        if n < 1:
            break
        best = estimate.flatten().sort(descending=True, stable=True).indices[:n]
        counts = torch.bincount(best // k, minlength=f)  # [F] children per frontier node
        has = (counts > 0).nonzero().flatten()
        m = counts[has]  # [Fh]
        tokens, _ = sample_without_replacement(q[has], int(m.max()), generator)  # all sampled: m <= support
        keep = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < m[:, None]  # [Fh, mmax]
        parent_slot = torch.arange(has.numel(), device=has.device).repeat_interleave(m)  # [n]
        child_tokens = tokens[keep]  # [n] node by node, each in draw order (draft vocabulary)
        logq = q[has][parent_slot].gather(1, child_tokens[:, None]).squeeze(1).float().log()
        child_tokens = child_tokens if vocab is None else vocab.ids[child_tokens]
        parents = frontier[has][parent_slot]
        scores = pool.scores[parents] + logq
        ranks = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)[keep]
        first = pool.size
        pool = DraftPool(
            tokens=torch.cat([pool.tokens, child_tokens]),
            parents=torch.cat([pool.parents, parents]),
            scores=torch.cat([pool.scores, scores]),
            ranks=torch.cat([pool.ranks, ranks]),
        )
        rows.append(q[has][parent_slot])
        frontier = first + scores.sort(descending=True, stable=True).indices[:expand].sort().values
    if not rows:
        raise ValueError("quotas is empty: a sampled tree needs at least one level")
    probs = torch.cat(rows)[: pool.size]
    return (
        tree_from_parents(pool.parents, pool.ranks),
        pool.tokens,
        probs if vocab is None else vocab.rows(probs),
    )


def level_quotas(acceptance: torch.Tensor, budget: int, depth: int) -> list[int]:
    """Nodes per depth of a sampled dynamic tree of ``budget`` nodes: the depth profile of the best
    static tree for ``acceptance`` (``tree_from_acceptance``), at most ``depth`` levels."""
    tree = tree_from_acceptance(acceptance, budget)
    sizes = torch.bincount(tree.depths, minlength=depth + 1)[1 : depth + 1].tolist()
    return [s for s in sizes if s > 0] or [1]
