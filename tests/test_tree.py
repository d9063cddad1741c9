"""Tree buffers: hand-checked cases plus properties over random trees."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selfspec.tree import build_tree, chain, prior_acceptance, tree_from_acceptance, tree_from_parents


def brute_ancestors(parents):
    out = []
    for i in range(len(parents)):
        chain_, j = set(), i
        while j >= 0:
            chain_.add(j)
            j = parents[j]
        out.append(chain_)
    return out


def test_small_tree_by_hand():
    tree = build_tree([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 2, 3]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert tree.ranks.tolist() == [-1, 0, 1, 0, 1, 0, 0]
    assert tree.num_children.tolist() == [2, 2, 1, 1, 0, 0, 0]
    assert tree.ancestor_mask[6].nonzero().flatten().tolist() == [0, 1, 3, 6]
    assert sorted(map(tuple, tree.retrieve_paths.tolist())) == [(0, 1, 3, 6), (0, 1, 4, -1), (0, 2, 5, -1)]
    assert tree.paths() == [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]


def test_root_only_and_chain():
    root = build_tree([])
    assert root.size == 1 and root.max_depth == 0 and root.ancestor_mask.tolist() == [[True]]
    c = chain(3)
    assert c.parents.tolist() == [-1, 0, 1, 2]
    assert torch.equal(c.ancestor_mask, torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    assert c.retrieve_paths.tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize(
    "paths, message",
    [
        ([(0, 1)], "needs its parent"),
        ([()], "implicit root"),
        ([(0,), (-1,)], "negative rank"),
    ],
)
def test_bad_paths(paths, message):
    with pytest.raises(ValueError, match=message):
        build_tree(paths)


@pytest.mark.parametrize(
    "parents, message",
    [
        ([0, 0], "node 0 must be the root"),
        ([-1, 1], "earlier node"),
        ([-1, 0, 3, 1], "earlier node"),
        ([], "non-empty"),
    ],
)
def test_bad_parents(parents, message):
    with pytest.raises(ValueError, match=message):
        tree_from_parents(parents)


@st.composite
def random_parents(draw):
    n = draw(st.integers(1, 40))
    return [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]


@settings(max_examples=150, deadline=None)
@given(random_parents())
def test_buffers_agree_with_parents(parents):
    tree = tree_from_parents(parents)
    ancestors = brute_ancestors(parents)
    for i in range(len(parents)):
        assert set(tree.ancestor_mask[i].nonzero().flatten().tolist()) == ancestors[i]
        assert tree.depths[i] == len(ancestors[i]) - 1
        assert tree.num_children[i] == parents.count(i) - (1 if i == -1 else 0)
    leaves = [i for i in range(len(parents)) if i not in parents]
    got = {tuple(p for p in row if p >= 0) for row in tree.retrieve_paths.tolist()}
    assert got == {tuple(sorted(ancestors[leaf])) for leaf in leaves}
    # ranks default to the order among siblings
    for i in range(1, len(parents)):
        assert tree.ranks[i] == sum(1 for j in range(1, i) if parents[j] == parents[i])


@settings(max_examples=100, deadline=None)
@given(random_parents())
def test_paths_round_trip(parents):
    tree = tree_from_parents(parents)
    again = build_tree(tree.paths())
    # build_tree re-orders by depth; same set of paths, same structure
    assert sorted(again.paths()) == sorted(tree.paths())
    assert again.size == tree.size and bool((again.depths[1:] >= again.depths[:-1]).all())


@pytest.mark.parametrize("nodes", [1, 2, 10, 40])
def test_tree_from_acceptance_is_best_first(nodes):
    acc = prior_acceptance(depth=4, top_k=5, first=0.7, decay=0.8)
    tree = tree_from_acceptance(acc, nodes)
    assert tree.size == nodes

    def value(path):
        v = 1.0
        for d, k in enumerate(path):
            v *= float(acc[d, k])
        return v

    chosen = {p: value(p) for p in tree.paths()}
    # any node not chosen but whose parent is chosen (a frontier node) is worth no more than the worst chosen
    frontier = [
        p + (k,) for p in [()] + list(chosen) for k in range(5) if len(p) < 4 and p + (k,) not in chosen
    ]
    if chosen and frontier:
        assert max(value(p) for p in frontier) <= min(chosen.values()) + 1e-12


def test_to_device_keeps_everything():
    tree = chain(2).to("cpu")
    assert tree.size == 3 and tree.ancestor_mask.dtype == torch.bool
