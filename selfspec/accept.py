"""Acceptance rules: which drafted path the target agrees with, and the target's own next token.

Given the target's logits (or warped probabilities) at every tree node, from one verify forward,
a rule returns the accepted path (node indices, root first) and a bonus token drawn from the
target at the path's end. The bonus is always the target's own token, so every step makes progress
even when no draft is kept.

- ``greedy_accept``: a child is correct when its token equals the target's argmax at its parent;
  the longest all-correct root path wins. The output is exactly the target's greedy decoding.
- ``sample_accept``: recursive rejection sampling over the tree (SpecInfer's multi-candidate
  speculative sampling; "recursive rejection sampling" when siblings are drawn without
  replacement). Lossless: the emitted tokens follow the target's warped distribution exactly.
- ``typical_accept``: Medusa's typical acceptance. Lossy, opt-in: it keeps any child the target
  finds "typical enough", which is faster but does not follow the target's distribution.

torch only; no models, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfspec.sampling import SamplingConfig, warp_logits
from selfspec.tree import TreeBuffers

# Guards divisions by a mass that is zero only in rows whose result is then discarded.
_TINY = 1e-30


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


def sample_accept(
    target_probs: torch.Tensor,
    tokens: torch.Tensor,
    tree: TreeBuffers,
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Acceptance:
    """Lossless recursive rejection sampling over a draft tree.

    target_probs: [T, V] the target's warped next-token distribution at each node
    (``warp_logits``); tokens: [T] node tokens; draft_probs: [T, V] or None, see below.

    The walk starts at the root. At the current node with target distribution p, its children
    x_1, x_2, ... are tried in node-index order. Child x_k, drawn from q_k, is accepted with
    probability min(1, p(x_k) / q_k(x_k)); on rejection p <- normalize(max(p - q_k, 0)) and the
    next child is tried. An accepted child becomes the current node (p resets to its target row);
    when every child is rejected, or at a leaf, the bonus token is drawn from the residual p.

    Why the output follows p exactly: each try is one standard speculative-sampling step, which
    emits x ~ q_k when accepted and otherwise a draw from normalize(max(p - q_k, 0)), and whose
    output is then distributed as p -- for *any* q_k, provided x_k really is distributed as q_k
    given everything that led to the try. Replacing "a draw from the residual" by "the next try,
    with the residual as its target" keeps that true by induction over the children, and moving to
    an accepted child repeats the argument one token deeper, so the whole emitted sequence follows
    the target. Two ways of choosing candidates satisfy the proviso:

    - ``draft_probs`` given: ``draft_probs[i]`` is the distribution node i's token was drawn from
      (the drafter's warped distribution at node i's parent; row 0 is unused), and siblings were
      drawn *without replacement* in node-index order. Then x_k ~ q_k = draft_probs[x_k's node]
      with the tokens of the earlier siblings removed and renormalized, which is what is used.
      Siblings must be distinct (raises otherwise), and whether a k-th child exists may depend on
      the earlier siblings but not on its own value (fixed-shape trees are fine; pruning by the
      sampled tokens' confidences is not). A rejected x_k had p(x_k) < q_k(x_k), so the residual
      has no mass left on it, consistent with q_{k+1} excluding it.
    - ``draft_probs=None``: candidates are deterministic given the prefix (top-k, static or
      dynamic trees), i.e. q_k is a point mass on x_k. Accept with probability p(x_k); the residual
      is p with x_k removed, renormalized. A duplicate sibling then has p(x) = 0 and is never
      accepted, so duplicates are harmless.

    Floating point: a rejection is only possible when the residual has mass, so a try whose
    residual is exactly empty (p(x) rounded just below q(x)) counts as accepted.
    """
    last, bonus = sample_accept_batch(
        target_probs[None], tokens[None], tree, None if draft_probs is None else draft_probs[None], generator
    )
    path = tree.ancestor_mask.to(last.device)[last[0]].nonzero().flatten()
    return Acceptance(path=path, bonus=bonus[0])


def sample_accept_batch(
    target_probs: torch.Tensor,
    tokens: torch.Tensor,
    tree: TreeBuffers,
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_accept`` for B independent trees of the same shape, vectorized over B.

    target_probs: [B, T, V]; tokens: [B, T]; draft_probs: [B, T, V] or None.
    Returns the last accepted node [B] (the path is ``tree.ancestor_mask[last]``) and the bonus
    token [B]. The loops run over depth and sibling slot, never over B or over nodes.
    """
    b, t, v = _check_sample_inputs(target_probs, tokens, tree, draft_probs)
    dev = target_probs.device
    vocab = torch.arange(v, device=dev)
    children = _children_table(tree).to(dev)  # [T, C]
    uniforms = torch.rand(b, t, generator=generator, device=dev)  # [B, T]; each node is tried at most once
    cur = torch.zeros(b, dtype=torch.long, device=dev)  # [B] deepest accepted node
    p = target_probs[:, 0].float()  # [B, V] the target's residual at cur
    tried = torch.zeros(b, v, dtype=torch.bool, device=dev)  # [B, V] tokens of cur's rejected children
    walking = torch.ones(b, dtype=torch.bool, device=dev)  # [B] False once a row has stopped for good
    for _ in range(tree.max_depth):
        nxt = cur.clone()  # [B] becomes the accepted child
        for slot in range(children.shape[1]):
            child = children[cur, slot]  # [B], -1 where cur has fewer children
            live = walking & (child >= 0) & (nxt == cur)  # a child to try, none accepted yet at this depth
            node = child.clamp(min=0)
            x = tokens.gather(1, node[:, None]).squeeze(1)  # [B]
            q = _proposal(draft_probs, node, x, tried)  # [B, V]
            accept, residual = _speculative_step(p, q, x, uniforms.gather(1, node[:, None]).squeeze(1))
            rejected = live & ~accept
            p = torch.where(rejected[:, None], residual, p)
            tried |= (vocab == x[:, None]) & rejected[:, None]
            nxt = torch.where(live & accept, child, nxt)
        walking = nxt != cur  # [B] rows that stopped keep their residual and never try again
        if not bool(walking.any()):
            break
        cur = nxt
        p = torch.where(walking[:, None], _row_of(target_probs, cur), p)
        tried &= ~walking[:, None]
    bonus = torch.multinomial(p, 1, generator=generator).squeeze(1)  # [B]
    return cur, bonus


def _speculative_step(
    p: torch.Tensor, q: torch.Tensor, x: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One speculative-sampling try of candidate x [B] ~ q [B, V] against target p [B, V].

    Accepts when u < p(x) / q(x) for u [B] ~ U[0, 1) (written without the division, so q(x) = 0
    cannot produce NaN). Returns accept [B] and the normalized residual max(p - q, 0) [B, V] that
    the rejected rows continue with.
    """
    p_x = p.gather(1, x[:, None]).squeeze(1)  # [B]
    q_x = q.gather(1, x[:, None]).squeeze(1)  # [B]
    residual = (p - q).clamp(min=0)  # [B, V]
    mass = residual.sum(-1)  # [B], exactly the rejection probability
    accept = (u * q_x < p_x) | (mass <= 0)
    return accept, residual / mass.clamp(min=_TINY)[:, None]


def _proposal(
    draft_probs: torch.Tensor | None, node: torch.Tensor, x: torch.Tensor, tried: torch.Tensor
) -> torch.Tensor:
    """The distribution q [B, V] that candidate token x [B] (at tree node [B]) was drawn from."""
    if draft_probs is None:
        return torch.nn.functional.one_hot(x, tried.shape[1]).float()  # deterministic candidate
    # Drawn without replacement: the earlier siblings could not be drawn again.
    q = _row_of(draft_probs, node).masked_fill(tried, 0)  # [B, V]
    return q / q.sum(-1, keepdim=True).clamp(min=_TINY)


def _row_of(probs: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
    """probs[b, node[b]] as fp32 [B, V], for probs [B, T, V] (a gather: faster than fancy indexing)."""
    return probs.gather(1, node[:, None, None].expand(-1, 1, probs.shape[2])).squeeze(1).float()


def _children_table(tree: TreeBuffers) -> torch.Tensor:
    """Children of every node [T, C], in ascending node index, right-padded with -1 (C >= 1)."""
    parents = tree.parents
    t = parents.numel()
    idx = torch.arange(t, device=parents.device)
    # Slot of a child = how many earlier nodes share its parent.
    slot = ((parents[:, None] == parents[None, :]) & (idx[None, :] < idx[:, None])).sum(1)  # [T]
    table = torch.full((t, max(int(tree.num_children.max()), 1)), -1, dtype=torch.long, device=parents.device)
    table[parents[1:], slot[1:]] = idx[1:]
    return table


def _check_sample_inputs(
    target_probs: torch.Tensor, tokens: torch.Tensor, tree: TreeBuffers, draft_probs: torch.Tensor | None
) -> tuple[int, int, int]:
    """(B, T, V) after checking shapes, and sibling distinctness when draft_probs is given."""
    if target_probs.ndim != 3:
        raise ValueError(
            f"target_probs must be [B, T, V] (or [T, V] for sample_accept), got {tuple(target_probs.shape)}"
        )
    b, t, v = target_probs.shape
    if t != tree.size or tuple(tokens.shape) != (b, t):
        raise ValueError(
            f"tree has {tree.size} nodes, target_probs {tuple(target_probs.shape)} and tokens "
            f"{tuple(tokens.shape)}; pass one target row and one token per tree node"
        )
    if draft_probs is None:
        return b, t, v
    if draft_probs.shape != target_probs.shape:
        raise ValueError(
            f"draft_probs has shape {tuple(draft_probs.shape)}, expected {tuple(target_probs.shape)}"
        )
    parents = tree.parents.to(tokens.device)
    siblings = (parents[:, None] == parents[None, :]) & ~torch.eye(t, dtype=torch.bool, device=tokens.device)
    if bool((siblings & (tokens[:, :, None] == tokens[:, None, :])).any()):
        raise ValueError(
            "two siblings carry the same token; with draft_probs, siblings must be drawn without replacement "
            "(torch.multinomial(q, k, replacement=False)); pass draft_probs=None for deterministic (top-k) "
            "candidates"
        )
    return b, t, v


def typical_accept(
    target_logits: torch.Tensor,
    tokens: torch.Tensor,
    tree: TreeBuffers,
    temperature: float,
    posterior_threshold: float = 0.09,
    posterior_alpha: float = 0.3,
    generator: torch.Generator | None = None,
) -> Acceptance:
    """Medusa's typical acceptance. LOSSY: the output does not follow the target's distribution.

    target_logits: [T, V]; tokens: [T]. A child is accepted when the target's probability of its
    token at the parent (at ``temperature``) exceeds min(posterior_threshold, posterior_alpha *
    exp(-entropy)): confident target distributions demand the likely tokens, flat ones accept
    more. The longest all-accepted path wins, ties going to the highest target likelihood; the
    bonus is drawn from the target at its end (its argmax at temperature 0, where the rule is
    exactly ``greedy_accept``). Opt in only when speed matters more than faithful sampling.
    """
    if not temperature >= 0:
        raise ValueError(
            f"temperature must be >= 0, got {temperature!r}; pass 0 for greedy typical acceptance"
        )
    probs = warp_logits(target_logits, SamplingConfig(temperature=float(temperature)))  # [T, V]
    entropy = -torch.xlogy(probs, probs).sum(-1)  # [T]
    threshold = (posterior_alpha * torch.exp(-entropy)).clamp(max=posterior_threshold)  # [T]
    parent = tree.parents.clamp(min=0)
    token_prob = probs[parent, tokens]  # [T] target probability of each node's token at its parent
    ok = token_prob > threshold[parent]
    ok[0] = True
    all_ok = ~(tree.ancestor_mask & ~ok[None, :]).any(1)  # [T] every ancestor accepted too
    node_logp = torch.where(ok, token_prob.log(), 0.0)
    node_logp[0] = 0.0
    path_logp = torch.where(tree.ancestor_mask, node_logp[None, :], 0.0).sum(1)  # [T]
    deepest = torch.where(all_ok, tree.depths, -1).max()
    best = torch.where(all_ok & (tree.depths == deepest), path_logp, -torch.inf).argmax()
    if temperature == 0:
        bonus = probs[best].argmax()
    else:
        bonus = torch.multinomial(probs[best], 1, generator=generator)[0]
    path = tree.ancestor_mask[best].nonzero().flatten()
    return Acceptance(path=path, bonus=bonus)
