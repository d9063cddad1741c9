"""Lookup proposals (selfspec.lookup): the n-gram index against a brute-force scan, the merged
tree's structure, and the engine's promises with lookup branches in the tree: greedy output equals
HF generate (lookup only, drafter + lookup) and sampled output follows the target (chi-square)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import selfspec
from selfspec.lookup import Lookup, NgramIndex, merge_draft, merged_tree
from selfspec.tree import DynamicTree, build_tree, tree_from_parents
from tests.helpers import chi2_pvalue, exact_two_token_probs, hf_greedy, make_tiny, randomized


def brute_matches(tokens, n):
    """End positions i < len - 1 where tokens[i-n+1 .. i] equals the last n tokens, newest first."""
    if n > len(tokens):
        return []
    suffix = tokens[-n:]
    return [i for i in range(len(tokens) - 2, n - 2, -1) if tokens[i - n + 1 : i + 1] == suffix]


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=6), min_size=1, max_size=12),
    min_n=st.integers(1, 3),
    extra=st.integers(0, 2),
)
def test_index_over_a_growing_sequence_equals_a_brute_force_scan(chunks, min_n, extra):
    index, seen = NgramIndex(min_n, min_n + extra), []
    for chunk in chunks:
        index.extend(chunk)
        seen += chunk
        for n in range(1, min_n + extra + 2):
            expected = brute_matches(seen, n) if min_n <= n <= min_n + extra else []
            assert index.matches(n) == expected, (seen, n)


@settings(max_examples=100, deadline=None)
@given(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=40), length=st.integers(1, 6))
def test_continuations_follow_real_matches_longest_first(tokens, length):
    index = NgramIndex(1, 3)
    index.extend(tokens)
    found = index.continuations(length, branches=3)
    conts = [c for _, c in found]
    assert len(conts) <= 3
    for n, c in found:
        assert 1 <= len(c) <= length
        # some suffix of the sequence occurs earlier followed by exactly this continuation
        assert any(tokens[i + 1 : i + 1 + len(c)] == c for m in range(1, 4) for i in brute_matches(tokens, m))
        # and the last n tokens occur earlier followed by its start (its n is a real match)
        assert any(
            c[: len(tokens) - i - 1] == tokens[i + 1 : i + 1 + len(c)] for i in brute_matches(tokens, n)
        )
    for a in conts:  # no continuation is a prefix of an earlier one
        assert sum(b[: len(a)] == a for b in conts) == 1
    longest = next((n for n in range(3, 0, -1) if brute_matches(tokens, n)), None)
    if longest is not None:
        i = brute_matches(tokens, longest)[0]
        assert conts[0][: len(tokens) - i - 1] == tokens[i + 1 : i + 1 + length]


def _paths(parents, tokens):
    out = []
    for i in range(len(parents)):
        p, node = [], i
        while node > 0:
            p.append(tokens[node])
            node = parents[node]
        out.append(tuple(reversed(p)))
    return out


@settings(max_examples=200, deadline=None)
@given(
    shape=st.lists(st.integers(0, 10), min_size=0, max_size=10),
    tokens=st.lists(st.integers(0, 4), min_size=11, max_size=11),
    branches=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=5), max_size=3),
)
def test_merged_tree_has_no_duplicate_paths_and_keeps_both_sources(shape, tokens, branches):
    parents = [-1] + [min(p, i) for i, p in enumerate(shape)]  # a random tree, parents first
    toks = tokens[: len(parents)]
    # siblings must have distinct tokens in a drafted tree: drop duplicates
    keep, seen = [0], {}
    for i in range(1, len(parents)):
        if parents[i] in keep and (keep.index(parents[i]), toks[i]) not in seen:
            seen[keep.index(parents[i]), toks[i]] = True
            keep.append(i)
    parents = [-1] + [keep.index(parents[i]) for i in keep[1:]]
    toks = [toks[i] for i in keep]
    new_parents, new_tokens, added = merge_draft(parents, toks, branches)
    paths = _paths(new_parents, new_tokens)
    assert len(paths) == len(set(paths))  # no node verified twice
    assert set(_paths(parents, toks)) <= set(paths)
    for b in branches:
        assert all(tuple(b[:k]) in paths for k in range(1, len(b) + 1))
    assert len(new_parents) == len(parents) + added
    assert added <= sum(len(b) for b in branches)
    assert set(paths) == set(_paths(parents, toks)) | {
        tuple(b[:k]) for b in branches for k in range(1, len(b) + 1)
    }
    tree = tree_from_parents(new_parents)  # validates parents before children
    if added:  # a merged tree is re-ordered by depth (an unchanged one is returned as given)
        assert torch.equal(tree.depths, tree.depths.sort().values)


def test_merged_tree_returns_the_draft_unchanged_when_nothing_is_added():
    tree = build_tree([(0,), (1,), (0, 0)])
    tokens = torch.tensor([7, 1, 2, 3])
    same_tree, same_tokens, no_probs = merged_tree(tree, tokens, [[1, 3], [2]])
    assert same_tree is tree and same_tokens is tokens and no_probs is None
    new_tree, new_tokens, no_probs = merged_tree(tree, tokens, [[1, 3, 4]])
    assert new_tree.size == 5 and new_tokens.tolist()[-1] == 4 and no_probs is None


def test_merged_tree_carries_sampled_rows_and_gives_added_nodes_point_masses():
    """With sampled candidates each node keeps the row it was drawn from through the reordering;
    lookup nodes are point masses and come after the drafted siblings."""
    tree = build_tree([(0,), (1,), (0, 0)])
    tokens = torch.tensor([7, 1, 2, 3])
    probs = torch.rand(4, 9)
    new_tree, new_tokens, new_probs = merged_tree(tree, tokens, [[5, 6], [2, 8]], probs)
    for node in range(1, 4):  # the drafted nodes: found by their (unique) tokens
        j = new_tokens.tolist().index(tokens[node].item())
        assert torch.equal(new_probs[j], probs[node])
    for tok in (5, 6, 8):
        j = new_tokens.tolist().index(tok)
        assert torch.equal(new_probs[j], torch.nn.functional.one_hot(torch.tensor(tok), 9).float())
    root_children = (new_tree.parents == 0).nonzero().flatten().tolist()
    assert [new_tokens[j].item() for j in root_children] == [1, 2, 5]  # drafted first


def test_short_matches_that_fail_shrink_while_long_matches_stay_long():
    """Each matched context length has its own acceptance estimate: 1-token matches the target
    keeps rejecting draft one token (never none), and a 4-token match in the same sequence still
    drafts max_len; a branch kept whole raises the estimates it used."""
    lk = Lookup(max_len=8, branches=1, threshold=0.1)
    base = list(range(1, 13))
    lk.begin(base + [50])
    lengths = []
    for i in range(10):
        lk.index.extend([1])  # only the unigram 1 matches (its bigram is new every time)
        (branch,) = lk.propose()
        lengths.append(len(branch))
        lk.update([300 + i])  # never what the branch says
    assert lengths[0] == 8 and lengths == sorted(lengths, reverse=True) and lengths[-1] == 1
    assert lk.keep_probability(1, 1) < 0.1 and lk.accepted_tokens == 0
    lk.index.extend([3, 4, 5, 6])  # the last 4 tokens occur in the base
    before = lk.keep_probability(4, 1)
    assert lk.propose() == [[7, 8, 9, 10, 11, 12, 50, 1]]
    lk.update([7, 8, 9, 10, 11, 12, 50, 1, 2])  # kept whole, plus the target's own token
    assert lk.keep_probability(4, 1) > before and lk.accepted_tokens == 8
    assert lk.proposed_nodes == sum(lengths) + 8


def test_a_sibling_is_drafted_only_where_it_is_worth_a_node():
    """A sibling counts only where the best branch fails: with the prior estimates (1/2 at
    depth 1 of a 1-token match) the sibling's first node is kept with chance 1/2 * 1/2 = 0.25,
    so it is drafted at threshold 0.1 and not at 0.3; budgets bound all branches together."""
    tokens = [7, 1, 7, 2, 3, 7]  # 7 was followed by 2 (most recent) and by 1
    low = Lookup(max_len=3, branches=2, threshold=0.1)
    low.begin(tokens)
    assert low.propose() == [[2, 3, 7], [1, 7, 2]]  # the sibling's third node: 0.25 * 2/3 * 3/4
    assert low.proposed_nodes == 6
    high = Lookup(max_len=3, branches=2, threshold=0.3)
    high.begin(tokens)
    assert high.propose() == [[2, 3]]  # 1/2 * 2/3 >= 0.3 > 1/2 * 2/3 * 3/4, and 0.25 < 0.3
    assert sum(map(len, low.propose(budget=2))) <= 2
    assert low.propose(budget=0) == []
    with pytest.raises(ValueError, match="max_len"):
        Lookup(max_len=0)
    with pytest.raises(ValueError, match="threshold"):
        Lookup(threshold=0.0)


REPEATING = torch.tensor([[5, 9, 17, 33, 5, 9, 17, 33, 5, 9, 17]])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_greedy_lookup_only_matches_hf(tiny_models, arch):
    """No drafter: the tree holds only lookup branches. Random tiny models fall into loops, which
    lookup then predicts: tokens must be kept (the branches are really verified) and equal HF's."""
    model = tiny_models(arch)
    accepted = 0
    for ids in (REPEATING, torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))):
        ref = hf_greedy(model, ids, 64)
        out = selfspec.generate(model, ids, max_new_tokens=64, eos_token_id=[], lookup=True)
        assert torch.equal(out.sequences, ref)
        accepted += out.stats.lookup_accepted
        assert out.stats.lookup_proposed > 0
    assert accepted > 0


@pytest.mark.parametrize(
    "tree", ["static", DynamicTree(depth=3, top_k=3, expand=2, budget=8)], ids=["static", "dynamic"]
)
@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_greedy_drafter_plus_lookup_matches_hf(tiny_models, kind, tree):
    model = tiny_models("llama")
    drafter = randomized(selfspec.new_drafter(kind, model), seed=5)
    ref = hf_greedy(model, REPEATING, 64)
    out = selfspec.generate(
        model,
        REPEATING,
        drafter=drafter,
        tree=tree,
        max_new_tokens=64,
        eos_token_id=[],
        lookup=Lookup(max_len=6),
    )
    assert torch.equal(out.sequences, ref)
    assert out.stats.lookup_accepted > 0


def test_greedy_lookup_in_bf16_with_exact_verification_matches_hf():
    model = make_tiny("qwen2", torch.bfloat16, seed=3)
    ref = hf_greedy(model, REPEATING, 48)
    out = selfspec.generate(model, REPEATING, max_new_tokens=48, eos_token_id=[], lookup=True)
    assert torch.equal(out.sequences, ref)


def test_sampling_with_lookup_follows_target_distribution():
    """Lookup branches are deterministic proposals (q = a point mass): the joint of the first two
    sampled tokens must still follow the target's distribution (chi-square, significance 0.001)."""
    model = make_tiny("llama", vocab=8, seed=31)
    ids = torch.tensor([[1, 3, 5, 1, 3, 5, 1, 3]])
    exact = exact_two_token_probs(model, ids, temperature=1.0)
    counts = torch.zeros(8, 8, dtype=torch.float64)
    proposed = 0
    for seed in range(1500):
        out = selfspec.generate(
            model,
            ids,
            max_new_tokens=2,
            temperature=1.0,
            seed=seed,
            eos_token_id=[],
            lookup=Lookup(max_len=2),
        )
        a, b = out.sequences[0, -2:].tolist()
        counts[a, b] += 1
        proposed += out.stats.lookup_proposed
    assert proposed > 0
    assert chi2_pvalue(counts, exact) > 1e-3


def test_bad_lookup_argument(tiny_models):
    with pytest.raises(ValueError, match="lookup must be"):
        selfspec.generate(tiny_models("llama"), REPEATING, lookup="yes")
