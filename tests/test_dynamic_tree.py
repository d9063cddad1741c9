"""Dynamic trees: frontier expansion and final node selection, against hand cases and slow
Python references (property tests over random confidences)."""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selfspec.tree import (
    DraftPool,
    build_tree,
    expand_frontier,
    grow_sampled_tree,
    grow_tree,
    level_quotas,
    medusa_proposer,
    prior_acceptance,
    sample_children,
    sample_without_replacement,
    select_nodes,
    tree_from_acceptance,
)
from tests.helpers import chi2_pvalue

PROPERTY = settings(max_examples=150, deadline=None)
log = math.log


# ---------------------------------------------------------------------------------------------
# expand_frontier


def test_expand_frontier_adds_every_child_and_keeps_the_best():
    pool = DraftPool.root(7)
    pool, frontier = expand_frontier(
        pool,
        torch.tensor([0]),
        torch.tensor([[log(0.6), log(0.3), log(0.1)]]),
        torch.tensor([[5, 6, 8]]),
        expand=2,
    )
    assert pool.tokens.tolist() == [7, 5, 6, 8] and pool.parents.tolist() == [-1, 0, 0, 0]
    assert pool.ranks.tolist() == [-1, 0, 1, 2] and frontier.tolist() == [1, 2]
    # Children: 0.6*0.5, 0.6*0.5, 0.3*0.9, 0.3*0.1: the tie keeps the earlier node.
    pool, frontier = expand_frontier(
        pool,
        frontier,
        torch.tensor([[log(0.5), log(0.5)], [log(0.9), log(0.1)]]),
        torch.tensor([[1, 2], [3, 4]]),
        expand=2,
    )
    assert pool.parents.tolist() == [-1, 0, 0, 0, 1, 1, 2, 2] and frontier.tolist() == [4, 5]
    torch.testing.assert_close(pool.scores.exp(), torch.tensor([1, 0.6, 0.3, 0.1, 0.3, 0.3, 0.27, 0.03]))


def test_expand_frontier_broadcasts_parent_independent_candidates():
    pool, _ = expand_frontier(
        DraftPool.root(0), torch.tensor([0]), torch.tensor([-0.1, -2.0]), torch.tensor([3, 4]), 2
    )
    pool, frontier = expand_frontier(
        pool, torch.tensor([1, 2]), torch.tensor([-0.5, -0.7]), torch.tensor([5, 6]), 3
    )
    assert pool.tokens.tolist() == [0, 3, 4, 5, 6, 5, 6] and pool.parents.tolist() == [-1, 0, 0, 1, 1, 2, 2]
    assert frontier.tolist() == [3, 4, 5]


@pytest.mark.parametrize(
    "logprobs, tokens, expand, match",
    [
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), 1, "F=1 frontier nodes"),
        (torch.zeros(1, 3), torch.zeros(1, 2, dtype=torch.long), 1, r"must both be \[F, K\]"),
        (torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.long), 0, "expand must be >= 1"),
    ],
)
def test_expand_frontier_checks_arguments(logprobs, tokens, expand, match):
    with pytest.raises(ValueError, match=match):
        expand_frontier(DraftPool.root(0), torch.tensor([0]), logprobs, tokens, expand)


# ---------------------------------------------------------------------------------------------
# select_nodes


@st.composite
def pools(draw, max_nodes=9, monotone=True):
    """(parents [N], scores [N] float64) of a random pool; cumulative log-probs when monotone."""
    n = draw(st.integers(1, max_nodes))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    # Few distinct edge values, so that ties (including log-prob 0) are common.
    edge = st.sampled_from([0.0, -0.25, -0.5, -1.0, -2.0]) | st.floats(-6.0, 0.0)
    scores = [0.0]
    for i in range(1, n):
        step = draw(edge) if monotone else draw(st.floats(-6.0, 6.0))
        scores.append(scores[parents[i]] + step if monotone else step)
    return torch.tensor(parents), torch.tensor(scores, dtype=torch.float64)


def best_closed_subset_value(parents: list[int], scores: list[float], size: int) -> float:
    """Brute force: the largest score sum over root-containing, ancestor-closed node sets of ``size``."""
    best = -math.inf
    for rest in itertools.combinations(range(1, len(parents)), size - 1):
        chosen = {0, *rest}
        if all(parents[i] in chosen for i in rest):
            best = max(best, sum(scores[i] for i in chosen))
    return best


def check_tree_matches_parents(tree) -> None:
    """Depths and ancestor masks recomputed with plain loops from the parents."""
    parents = tree.parents.tolist()
    assert parents[0] == -1 and all(0 <= p < i for i, p in enumerate(parents) if i)
    depth, ancestors = [0], [{0}]
    for i in range(1, len(parents)):
        depth.append(depth[parents[i]] + 1)
        ancestors.append(ancestors[parents[i]] | {i})
    assert tree.depths.tolist() == depth
    mask = [[j in ancestors[i] for j in range(len(parents))] for i in range(len(parents))]
    assert tree.ancestor_mask.tolist() == mask


@PROPERTY
@given(pool=pools(), budget=st.integers(1, 11))
def test_select_nodes_is_the_best_ancestor_closed_set(pool, budget):
    parents, scores = pool
    tree, kept = select_nodes(parents, scores, budget)
    n, m = parents.numel(), min(budget, parents.numel())
    assert tree.size == m and kept.tolist() == sorted(set(kept.tolist())) and kept[0] == 0
    check_tree_matches_parents(tree)
    kept_list = kept.tolist()
    assert all(parents[k].item() in kept_list for k in kept_list[1:])  # ancestor-closed
    assert [kept_list[p] for p in tree.parents[1:].tolist()] == parents[kept[1:]].tolist()  # re-indexed
    value = float(scores[kept].sum())
    assert math.isclose(value, best_closed_subset_value(parents.tolist(), scores.tolist(), m), abs_tol=1e-9)
    if len(set(scores[1:].tolist())) == n - 1:  # no ties: the best set is unique, so compare sets
        order = sorted(range(1, n), key=lambda i: -scores[i].item())
        assert kept_list == sorted([0] + order[: m - 1])


@PROPERTY
@given(pool=pools(monotone=False), budget=st.integers(1, 11))
def test_select_nodes_keeps_ancestors_even_when_scores_rise_along_paths(pool, budget):
    parents, scores = pool
    tree, kept = select_nodes(parents, scores, budget)
    kept_list = kept.tolist()
    assert tree.size == min(budget, parents.numel())
    assert all(parents[k].item() in kept_list for k in kept_list[1:])
    check_tree_matches_parents(tree)


def test_select_nodes_passes_ranks_and_breaks_ties_by_pool_order():
    parents = torch.tensor([-1, 0, 0, 1, 2])
    scores = torch.tensor([0.0, -1.0, -1.0, -1.0, -1.0])  # log-prob 0 children tie with their parents
    tree, kept = select_nodes(parents, scores, budget=4, ranks=torch.tensor([-1, 0, 1, 0, 3]))
    assert kept.tolist() == [0, 1, 2, 3] and tree.parents.tolist() == [-1, 0, 0, 1]
    assert tree.paths() == [(0,), (1,), (0, 0)]


@pytest.mark.parametrize(
    "parents, scores, budget, match",
    [
        ([-1, 0], [0.0, -1.0], 0, "budget must be >= 1"),
        ([-1, 0], [0.0], 2, r"must both be \[N\]"),
        ([-1, 0], [0.0, math.nan], 2, "NaN"),
        ([-1, 1], [0.0, -1.0], 2, "parent must be an earlier node"),
        ([0, 0], [0.0, -1.0], 2, "must be the root"),
    ],
)
def test_select_nodes_checks_arguments(parents, scores, budget, match):
    with pytest.raises(ValueError, match=match):
        select_nodes(torch.tensor(parents), torch.tensor(scores), budget)


# ---------------------------------------------------------------------------------------------
# grow_tree, against a slow reference of the same beam-then-select process


def reference_grow(root, children_of, depth, expand, budget):
    """Paths (ranks) and tokens of the kept nodes, with Python lists and float32 scalars.
    children_of(level, token) -> [(logprob, token)] in rank order."""
    nodes = [{"token": root, "parent": -1, "score": np.float32(0), "path": ()}]
    frontier = [0]
    for level in range(depth):
        new = []
        for f in frontier:
            for rank, (lp, tok) in enumerate(children_of(level, nodes[f]["token"])):
                score = np.float32(nodes[f]["score"]) + np.float32(lp)  # float32, as in the pool
                nodes.append({"token": tok, "parent": f, "score": score, "path": nodes[f]["path"] + (rank,)})
                new.append(len(nodes) - 1)
        frontier = sorted(sorted(new, key=lambda i: -nodes[i]["score"])[:expand])  # stable: earlier wins ties
    kept = sorted(sorted(range(1, len(nodes)), key=lambda i: -nodes[i]["score"])[: budget - 1])
    return [nodes[i]["path"] for i in kept], [root] + [nodes[i]["token"] for i in kept]


logprob_tables = st.integers(1, 3).flatmap(
    lambda k: st.lists(
        st.lists(st.sampled_from([0.0, -0.5, -1.0]) | st.floats(-5.0, 0.0, width=32), min_size=k, max_size=k),
        min_size=4,
        max_size=4,
    )
)


@PROPERTY
@given(table=logprob_tables, depth=st.integers(0, 4), expand=st.integers(1, 4), budget=st.integers(1, 12))
def test_grow_tree_with_medusa_heads_matches_reference(table, depth, expand, budget):
    head_logprobs = torch.tensor(table, dtype=torch.float32)  # [D=4, K]
    head_tokens = torch.arange(head_logprobs.numel()).reshape(head_logprobs.shape) + 10
    tree, tokens = grow_tree(3, medusa_proposer(head_logprobs, head_tokens), depth, expand, budget)

    def children_of(level, token):
        return list(zip(head_logprobs[level].tolist(), head_tokens[level].tolist()))

    paths, ref_tokens = reference_grow(3, children_of, depth, expand, budget)
    assert tree.paths() == paths and tokens.tolist() == ref_tokens
    check_tree_matches_parents(tree)


@PROPERTY
@given(
    seed=st.integers(0, 10_000), depth=st.integers(1, 4), expand=st.integers(1, 5), budget=st.integers(1, 16)
)
def test_grow_tree_with_a_parent_dependent_drafter_matches_reference(seed, depth, expand, budget):
    # An EAGLE-like drafter: a bigram table; each node's children are the top-3 after its token.
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(6, 6, generator=g).log_softmax(-1)  # [V, V]
    top_logp, top_tok = table.topk(3, dim=-1)  # [V, 3]

    def propose(pool, frontier, level):
        parent_tokens = pool.tokens[frontier]
        return top_logp[parent_tokens], top_tok[parent_tokens]

    def children_of(level, token):
        return list(zip(top_logp[token].tolist(), top_tok[token].tolist()))

    tree, tokens = grow_tree(2, propose, depth, expand, budget)
    paths, ref_tokens = reference_grow(2, children_of, depth, expand, budget)
    assert tree.paths() == paths and tokens.tolist() == ref_tokens


@pytest.mark.parametrize("budget", [1, 4, 9, 15])
def test_full_expansion_equals_the_best_first_static_tree(budget):
    # When every node is expanded, keeping the best nodes by cumulative log-prob is Medusa's
    # best-first construction from per-head acceptance rates (the lead's tree_from_acceptance).
    probs = torch.tensor(
        [[0.6, 0.25, 0.1], [0.55, 0.3, 0.12], [0.45, 0.33, 0.2]], dtype=torch.float64
    )  # no ties
    tokens = torch.arange(9).reshape(3, 3)
    tree, _ = grow_tree(0, medusa_proposer(probs.log().float(), tokens), depth=3, expand=27, budget=budget)
    assert tree.paths() == tree_from_acceptance(probs, budget).paths()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"depth": -1}, "depth must be >= 0"),
        ({"depth": 3}, "there are 2 Medusa heads"),
        ({"budget": 0}, "budget must be >= 1"),
        ({"expand": 0}, "expand must be >= 1"),
    ],
)
def test_grow_tree_checks_arguments(kwargs, match):
    args = {"depth": 2, "expand": 2, "budget": 4, **kwargs}
    propose = medusa_proposer(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=match):
        grow_tree(0, propose, **args)


def test_medusa_proposer_checks_shapes():
    with pytest.raises(ValueError, match=r"must both be \[D, K\]"):
        medusa_proposer(torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.long))


# ----------------------------------------------------------------------- sampled candidates


def test_draws_without_replacement_follow_the_sequential_rule():
    """The ordered pair (first, second draw) has probability q(a) q(b) / (1 - q(a))."""
    q = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4, 4, dtype=torch.float64)
    for _ in range(4000):
        tokens, sampled = sample_without_replacement(q, 2, g)
        assert bool(sampled.all())
        counts[tokens[0, 0], tokens[0, 1]] += 1
    qd = q[0].double()
    expected = qd[:, None] * qd[None, :] / (1 - qd[:, None])
    expected.fill_diagonal_(0)
    assert chi2_pvalue(counts, expected / expected.sum()) > 1e-3


def test_draws_past_the_support_take_distinct_fillers_by_the_fallback_scores():
    q = torch.tensor([[0.0, 0.7, 0.0, 0.3, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    fallback = torch.tensor([[5.0, 4.0, 1.0, 3.0, 2.0], [0.0, 1.0, 9.0, 2.0, 3.0]])
    tokens, sampled = sample_without_replacement(q, 4, torch.Generator().manual_seed(1), fallback)
    assert sampled.tolist() == [[True, True, False, False], [True, False, False, False]]
    assert sorted(tokens[0, :2].tolist()) == [1, 3] and tokens[0, 2:].tolist() == [0, 4]
    assert tokens[1].tolist() == [2, 4, 3, 1]
    with pytest.raises(ValueError, match="k must be in"):
        sample_without_replacement(q, 6)


def test_sample_children_use_each_parents_draws_in_sibling_order():
    tree = build_tree([(0,), (1,), (0, 0), (0, 1), (1, 0)])  # depth 2: two children of node 1, one of node 2
    q = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]])  # rows: nodes 1 and 2
    lo, hi = tree.level_bounds[2], tree.level_bounds[3]
    tokens, rows = sample_children(tree, lo, hi, q, tree.level_bounds[1], torch.Generator().manual_seed(0))
    assert sorted(tokens[:2].tolist()) == [1, 2] and tokens[2].item() == 3
    assert torch.equal(rows[0], q[0]) and torch.equal(rows[1], q[0]) and torch.equal(rows[2], q[1])


def test_sampled_tree_spends_each_levels_quota_before_drawing():
    vocab = 16
    g = torch.Generator().manual_seed(3)
    table = torch.rand(vocab, vocab, generator=g).softmax(-1)  # the next-token distribution after token t

    def level_probs(pool, frontier, level):
        return table[pool.tokens[frontier]]

    tree, tokens, probs = grow_sampled_tree(torch.tensor(0), level_probs, [3, 4, 2], 3, 2, g)
    assert torch.bincount(tree.depths).tolist() == [1, 3, 4, 2]
    for node in range(1, tree.size):  # each node carries the distribution it was drawn from
        assert torch.equal(probs[node], table[tokens[tree.parents[node]]])
        siblings = tokens[tree.parents == tree.parents[node]]
        assert siblings.unique().numel() == siblings.numel()
    # depth-2 nodes hang below at most `expand` = 2 depth-1 nodes; no node has more than 3 children
    assert tree.parents[tree.depths == 2].unique().numel() <= 2
    assert int(tree.num_children.max()) <= 3
    assert torch.equal(probs[0], torch.zeros(vocab))


def test_sampled_tree_stops_where_the_supports_run_out():
    point = torch.nn.functional.one_hot(torch.tensor(2), 6).float()  # one possible token everywhere
    tree, tokens, _ = grow_sampled_tree(torch.tensor(0), lambda pool, frontier, level: point, [4, 4], 4, 4)
    assert torch.bincount(tree.depths).tolist() == [1, 1, 1] and tokens.tolist() == [0, 2, 2]


def test_level_quotas_follow_the_best_static_tree():
    acc = prior_acceptance(4, 4, first=0.7, decay=0.8)
    quotas = level_quotas(acc, budget=12, depth=4)
    assert sum(quotas) == 11 and quotas == torch.bincount(tree_from_acceptance(acc, 12).depths)[1:].tolist()
    assert level_quotas(acc, budget=12, depth=2) == quotas[:2]
