"""Lookup proposals: draft tokens copied from the context, no trained drafter needed.

When a reply repeats its input (a summary, a rewrite, a code edit, an answer quoting a document)
or itself, the tokens after an earlier occurrence of the current suffix predict the next ones.
``NgramIndex`` keeps every n-gram of the sequence (prompt + generated tokens) with the positions
where it ended, and grows with the sequence (``extend``): a query is a dictionary look-up, never a
rescan. ``Lookup`` turns matches into draft branches (longest suffix match first, several
matches as sibling branches) and drafts each node while its estimated chance of being kept,
learned from what the target accepted, is high enough: a long match that has been right drafts
up to ``max_len`` tokens, a short one that keeps failing drafts one.

``merge_draft`` puts the drafter's tree and the lookup branches into one tree (shared prefixes
merged, so no node is verified twice); the target verifies it in one forward like any tree.
Lookup nodes are deterministic proposals (q = a point mass), which the acceptance rules already
handle, so greedy output stays the target's and sampling stays lossless.

Plain Python over token lists (CPU-side): torch is used only to hand the merged tree over.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from selfspec.tree import TreeBuffers, tree_from_parents

MAX_LOOKED = 64  # occurrences examined per query: a common unigram can occur thousands of times


class NgramIndex:
    """Every n-gram (``min_n <= n <= max_n``) of a growing token sequence, with the positions where
    it ends, restricted to occurrences followed by at least one token (so every match has a
    continuation). ``extend`` costs O(max_n) per appended token."""

    def __init__(self, min_n: int = 1, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self._ends: dict[tuple[int, ...], list[int]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for tok in tokens:
            self.tokens.append(int(tok))
            end = len(self.tokens) - 2  # the n-grams ending here now have a continuation
            for n in range(self.min_n, min(self.max_n, end + 1) + 1):
                self._ends.setdefault(tuple(self.tokens[end - n + 1 : end + 1]), []).append(end)

    def matches(self, n: int) -> list[int]:
        """End positions of earlier occurrences of the last ``n`` tokens, most recent first."""
        if n > len(self.tokens) or not self.min_n <= n <= self.max_n:
            return []
        return self._ends.get(tuple(self.tokens[-n:]), [])[::-1]

    def continuations(self, length: int, branches: int) -> list[tuple[int, list[int]]]:
        """Up to ``branches`` distinct continuations of at most ``length`` tokens, each with the
        suffix length n it matched: longest suffix match first, the most recent occurrence first
        within one suffix length. A continuation that is a prefix of one already taken adds
        nothing and is skipped; one that extends a taken one (a match near the end of the
        sequence is cut short) replaces it."""
        out: list[tuple[int, list[int]]] = []
        if length < 1 or branches < 1:
            return out
        looked = 0
        for n in range(min(self.max_n, len(self.tokens)), self.min_n - 1, -1):
            for end in self.matches(n):
                looked += 1
                if looked > MAX_LOOKED or (len(out) == branches and all(len(c) == length for _, c in out)):
                    return out
                cont = self.tokens[end + 1 : end + 1 + length]
                if any(taken[: len(cont)] == cont for _, taken in out):
                    continue
                shorter = next((k for k, (_, taken) in enumerate(out) if cont[: len(taken)] == taken), None)
                if shorter is not None:
                    out[shorter] = (out[shorter][0], cont)
                elif len(out) < branches:
                    out.append((n, cont))
        return out


CONTEXT_CAP = 8  # matched context lengths above this share one acceptance estimate
PRIOR_WEIGHT = 2.0  # pseudo-observations behind each estimate before any step


@dataclass
class Lookup:
    """Lookup drafting settings and per-sequence state (one object per ``generate`` call).

    max_len: the longest branch drafted; branches: sibling branches from different matches;
    min_n/max_n: suffix lengths matched (longest first); threshold: a node is drafted while the
    estimated probability that the target keeps it is at least this.

    The estimate follows what the target accepted in this sequence. A node at depth d of a
    branch that matched the last n tokens is kept, given its d - 1 ancestors were, with a
    probability that depends on the matched context k = n + d - 1 (once the first tokens of a
    1-token match are accepted it is as good as a longer match): one running estimate per k
    (capped at ``CONTEXT_CAP``), started at k / (k + 1) with weight ``PRIOR_WEIGHT``. A branch
    keeps its nodes while the product of these probabilities (the chance the node is kept) is at
    least ``threshold``; a sibling branch counts only where the branches above it would fail.
    The best match always drafts at least one token, so every estimate keeps being observed.
    On development prompts a 4-token match was kept 89-94% of the time at depth 1 and a 1-token
    match 21-24%, which the earlier single running mean of tokens kept could not tell apart.
    Defaults (1 branch, threshold 0.2) were chosen there against the earlier rule (2 branches):
    47.3 vs 43.0 tok/s on grounded prompts, 37.8 vs 37.1 on chat (benchmarks/README.md,
    session 10)."""

    max_len: int = 12
    branches: int = 1
    min_n: int = 1
    max_n: int = 4
    threshold: float = 0.2
    index: NgramIndex | None = field(default=None, init=False, repr=False)
    proposed: list[list[int]] = field(default_factory=list, init=False, repr=False)
    proposed_nodes: int = field(default=0, init=False)  # statistics over the whole call
    accepted_tokens: int = field(default=0, init=False)
    _first_n: int = field(default=0, init=False, repr=False)  # suffix length of the best branch
    _kept: list[float] = field(default_factory=list, init=False, repr=False)  # per context k
    _seen: list[float] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        for name, least in (("max_len", 1), ("branches", 1), ("min_n", 1), ("max_n", self.min_n)):
            if getattr(self, name) < least:
                raise ValueError(f"Lookup.{name} must be >= {least}, got {getattr(self, name)}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"Lookup.threshold must be in (0, 1], got {self.threshold}")

    def fresh(self) -> Lookup:
        """The same settings with no state: one per sequence."""
        return dataclasses.replace(self)

    def begin(self, tokens: Sequence[int]) -> None:
        self.index = NgramIndex(self.min_n, self.max_n)
        self.index.extend(tokens)
        self._seen = [PRIOR_WEIGHT] * (CONTEXT_CAP + 1)
        self._kept = [PRIOR_WEIGHT * k / (k + 1) for k in range(CONTEXT_CAP + 1)]

    def keep_probability(self, n: int, depth: int) -> float:
        """Estimated chance that a node at ``depth`` of a branch matching ``n`` tokens is kept,
        given its ancestors were."""
        k = min(n + depth - 1, CONTEXT_CAP)
        return self._kept[k] / self._seen[k]

    @property
    def max_nodes(self) -> int:
        """Most drafted nodes one step's branches can add."""
        return self.max_len * self.branches

    def propose(self, budget: int | None = None) -> list[list[int]]:
        """Branches continuing the sequence as extended so far (its last token is the root), at
        most ``budget`` drafted nodes in all (default ``max_nodes``)."""
        if self.index is None:
            raise RuntimeError("Lookup.begin(tokens) must run before propose()")
        room = self.max_nodes if budget is None else budget
        out: list[list[int]] = []
        added = 0  # new nodes: a sibling's shared prefix is merged into the best branch
        reach: list[float] = [1.0]  # reach[d]: chance the best branch's first d nodes are kept
        for n, cont in self.index.continuations(min(self.max_len, room), self.branches):
            if not out:
                self._first_n, start, chance = n, 0, 1.0
            else:  # its new nodes count only where the best branch fails
                start = _common_prefix(cont, out[0])
                if start >= len(out[0]):
                    continue
                chance = reach[start] - reach[start + 1]
            take = start
            for depth in range(start + 1, min(len(cont), start + room) + 1):
                chance *= self.keep_probability(n, depth)
                if chance < self.threshold and (out or depth > 1):
                    break
                take = depth
                if not out:
                    reach.append(chance)
            if take > start:
                out.append(cont[:take])
                room -= take - start
                added += take - start
        self.proposed = out
        self.proposed_nodes += added
        return out

    def update(self, kept: Sequence[int]) -> None:
        """After a step: ``kept`` = the accepted drafted tokens + the target's own token."""
        if self.proposed:
            hits = [_common_prefix(c, kept) for c in self.proposed]
            self.accepted_tokens += max(hits)
            hit = hits[0]
            for depth in range(1, min(hit + 1, len(self.proposed[0])) + 1):  # the best branch's nodes reached
                k = min(self._first_n + depth - 1, CONTEXT_CAP)
                self._seen[k] += 1
                self._kept[k] += depth <= hit
        self.index.extend(kept)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def merge_draft(
    parents: Sequence[int], tokens: Sequence[int], branches: Sequence[Sequence[int]]
) -> tuple[list[int], list[int], int]:
    """Merge token branches below the root into a tree given by ``parents``/``tokens`` (node 0 the
    root, parents before children, siblings with distinct tokens). A branch follows existing nodes
    while its tokens match and adds nodes from there, so no path is verified twice. Returns the
    merged parents and tokens, ordered by depth (every tree consumer's order), and the number of
    nodes added."""
    par, tok, added, _ = _merge(parents, tokens, branches)
    return par, tok, added


def _merge(
    parents: Sequence[int], tokens: Sequence[int], branches: Sequence[Sequence[int]]
) -> tuple[list[int], list[int], int, list[int]]:
    """``merge_draft``, plus the merged node order: entry j is the node's index before the merge
    (indices >= len(parents) are added nodes). Added nodes follow their existing siblings."""
    children: list[dict[int, int]] = [{} for _ in parents]
    for i in range(1, len(parents)):
        children[parents[i]][tokens[i]] = i
    par, tok = list(parents), list(tokens)
    for branch in branches:
        node = 0
        for t in branch:
            nxt = children[node].get(t)
            if nxt is None:
                nxt = len(par)
                par.append(node)
                tok.append(int(t))
                children.append({})
                children[node][t] = nxt
            node = nxt
    added = len(par) - len(parents)
    if not added:
        return par, tok, 0, list(range(len(par)))
    order = [0]  # breadth-first from the root: ordered by depth, parents before children
    for node in order:
        order.extend(children[node].values())
    new = {old: k for k, old in enumerate(order)}
    return [-1] + [new[par[i]] for i in order[1:]], [tok[i] for i in order], added, order


def merged_tree(
    draft_tree: TreeBuffers,
    draft_tokens: torch.Tensor,
    branches: Sequence[Sequence[int]],
    draft_probs: torch.Tensor | None = None,
):
    """``merge_draft`` on a drafted tree: returns (TreeBuffers, tokens [T], probs [T, V] or None)
    or the inputs unchanged when the branches add no node. With sampled candidates
    (``draft_probs``, see ``Draft.probs``) the added nodes are point masses on their tokens: they
    come after every drafted sibling and never repeat one's token, as the rejection rule needs."""
    parents, tokens, added, order = _merge(draft_tree.parents.tolist(), draft_tokens.tolist(), branches)
    if not added:
        return draft_tree, draft_tokens, draft_probs
    device = draft_tokens.device
    tokens = torch.tensor(tokens, device=device)
    probs = None
    if draft_probs is not None:
        old = torch.tensor(order, device=device)
        drafted = old < draft_probs.shape[0]
        point = torch.nn.functional.one_hot(tokens, draft_probs.shape[-1]).to(draft_probs.dtype)
        probs = torch.where(drafted[:, None], draft_probs[old.clamp(max=draft_probs.shape[0] - 1)], point)
    return tree_from_parents(torch.tensor(parents, device=device)), tokens, probs
