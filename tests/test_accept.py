"""Acceptance rules: exact cases from hand-made distributions, and statistical tests that sampled
outputs follow the target (chi-square at significance 0.001, with power shown on broken samplers)."""

import math

import pytest
import torch
from scipy import stats

import selfspec.accept as accept_module
from selfspec.accept import greedy_accept, sample_accept, sample_accept_batch, typical_accept
from selfspec.sampling import SamplingConfig, warp_logits
from selfspec.tree import build_tree, chain

V = 5
# 0 root; 1 = (0,), 2 = (1,) its children; 3 = (0, 0) below node 1.
SMALL = build_tree([(0,), (1,), (0, 0)])
WIDE = build_tree([(k,) for k in range(4)])
WIDE_3 = build_tree([(0,), (1,), (2,)])
ALPHA = 1e-3  # significance level of every statistical test in this file


def distinct_sibling_tokens(tree, logits, g) -> torch.Tensor:
    """Node tokens [T], siblings distinct; one of a node's children (rank 0 or 1) carries the
    target's argmax with probability 1/3 to 2/3, so greedy paths stop at varied depths."""
    right = logits.argmax(-1)[tree.parents.clamp(min=0)]  # [T] the token greedy accepts at each node
    offset = torch.randint(-1, 2, (tree.size,), generator=g)[tree.parents.clamp(min=0)]  # per parent
    return (right + tree.ranks.clamp(min=0) + offset) % V


def point(token: int, v: int = V) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(token), v).float()


def rows(*tokens: int) -> torch.Tensor:
    """[T, V] point masses: the target's next token at node i is tokens[i] for sure."""
    return torch.stack([point(t) for t in tokens])


# ---------------------------------------------------------------------------------------------
# greedy_accept


@pytest.mark.parametrize(
    "tree, argmax, tokens, path, bonus",
    [
        (chain(3), [1, 2, 3, 4], [0, 1, 2, 3], [0, 1, 2, 3], 4),  # every draft right: bonus after the leaf
        (chain(3), [1, 2, 3, 4], [0, 1, 0, 3], [0, 1], 2),  # wrong at depth 2
        (chain(3), [4, 2, 3, 4], [0, 1, 2, 3], [0], 4),  # wrong at depth 1
        (WIDE, [3, 0, 0, 0, 0], [0, 1, 2, 3, 4], [0, 3], 0),  # the third of four siblings is right
        (SMALL, [2, 3, 0, 4], [0, 1, 2, 3], [0, 2], 0),  # reject the first child, accept the second
        (SMALL, [1, 3, 0, 4], [0, 1, 1, 3], [0, 1, 3], 4),  # duplicate siblings: the deeper one wins
        (WIDE, [2, 0, 0, 0, 0], [0, 2, 2, 1, 2], [0, 1], 0),  # equally deep: the first node on ties
    ],
)
def test_greedy_accept_cases(tree, argmax, tokens, path, bonus):
    logits = rows(*argmax) * 3.0 - 1.0
    out = greedy_accept(logits, torch.tensor(tokens), tree)
    assert out.path.tolist() == path and out.bonus.item() == bonus


def test_greedy_accept_breaks_logit_ties_by_first_index():
    logits = torch.tensor([[0.0, 2.0, 2.0, 0.0, 0.0]] * 3)
    out = greedy_accept(logits, torch.tensor([0, 2, 1]), build_tree([(0,), (1,)]))
    assert out.path.tolist() == [0, 2] and out.bonus.item() == 1


# ---------------------------------------------------------------------------------------------
# sample_accept: exact cases (distributions chosen so that every outcome is certain)


@pytest.mark.parametrize(
    "tree, target_next, tokens, path, bonus",
    [
        (SMALL, [1, 3, 0, 4], [0, 1, 2, 3], [0, 1, 3], 4),  # accept all, bonus drawn at the leaf
        (SMALL, [4, 3, 0, 4], [0, 1, 2, 3], [0], 4),  # reject at depth 1: bonus from the residual
        (SMALL, [2, 3, 0, 4], [0, 1, 2, 3], [0, 2], 0),  # reject the first child, accept the second
        (SMALL, [1, 2, 0, 4], [0, 1, 2, 3], [0, 1], 2),  # accept depth 1, reject its only child
        (chain(3), [1, 2, 3, 0], [0, 1, 2, 3], [0, 1, 2, 3], 0),  # bonus after a full chain
        (chain(0), [3], [0], [0], 3),  # root only
    ],
)
@pytest.mark.parametrize("with_draft", [False, True])
def test_sample_accept_certain_outcomes(tree, target_next, tokens, path, bonus, with_draft):
    # With draft_probs each token was drawn from a uniform q: p(x) is 0 or 1 here, so every
    # acceptance is certain either way.
    draft = torch.full((tree.size, V), 1.0 / V) if with_draft else None
    out = sample_accept(
        rows(*target_next), torch.tensor(tokens), tree, draft, torch.Generator().manual_seed(0)
    )
    assert out.path.tolist() == path and out.bonus.item() == bonus


def test_rejection_continues_from_the_residual_not_the_target():
    # x=1 (q=.5) has p=0: rejected, residual max(p - q, 0) = [0, 0, 0, 0, 1] (q also covers token 2).
    # Then x=2, drawn from q without token 1, has residual mass 0: rejected. A sampler that
    # skipped the residual would emit token 2 half the time.
    p = torch.tensor([0.0, 0.0, 0.5, 0.0, 0.5])
    q = torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0])
    tree = build_tree([(0,), (1,)])
    for seed in range(20):
        out = sample_accept(
            torch.stack([p, p, p]),
            torch.tensor([0, 1, 2]),
            tree,
            torch.stack([q, q, q]),
            torch.Generator().manual_seed(seed),
        )
        assert out.path.tolist() == [0] and out.bonus.item() == 4


def test_a_walk_that_stopped_does_not_try_again():
    # Both root children rejected (p = 0 on tokens 1, 2): residuals [0, 0, 0, .3, .5] / .8, then
    # minus q without token 1 = [0, 0, 2/3, 1/3, 0]: token 3 keeps 1/16 of the mass. Trying the
    # children again at depth 2 would subtract token 3's draft mass once more and emit it never.
    # The second half of the batch accepts node 1 for sure, so the walk does go on to depth 2.
    b = 20_000
    p = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.5]).repeat(2 * b, 4, 1)
    p[b:, 0] = point(1)
    q = torch.tensor([0.0, 0.4, 0.4, 0.2, 0.0]).expand(2 * b, 4, V)
    tokens = torch.tensor([0, 1, 2, 3]).expand(2 * b, 4)
    last, bonus = sample_accept_batch(p, tokens, SMALL, q, torch.Generator().manual_seed(0))
    assert bool((last[:b] == 0).all()) and bool((last[b:] != 0).all())
    assert set(bonus[:b].tolist()) == {3, 4}
    assert stats.binomtest(int((bonus[:b] == 3).sum()), b, 1 / 16).pvalue > ALPHA


def test_draft_equal_to_target_is_always_accepted():
    g = torch.Generator().manual_seed(1)
    p = torch.rand(3, 4, V, generator=g).softmax(-1)  # [B, T, V] with T = chain(3).size
    tokens = torch.multinomial(p.reshape(-1, V), 1, generator=g).reshape(3, 4)
    # The draft at node i is the target at its parent: accept with probability p/q = 1 everywhere.
    draft = torch.cat([p[:, :1], p[:, :-1]], dim=1)
    last, _ = sample_accept_batch(p, tokens, chain(3), draft, g)
    assert last.tolist() == [3, 3, 3]


def test_duplicate_deterministic_siblings_are_never_accepted_twice():
    # Root children tokens 1, 1, 2 and p = (.5 on 1, .5 on 2): node 1 is accepted half the time;
    # after its rejection p(1) = 0, so node 2 never is and node 3 always is.
    b = 4000
    p = torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0]).expand(b, 4, V)
    tokens = torch.tensor([0, 1, 1, 2]).expand(b, 4)
    last, _ = sample_accept_batch(p, tokens, WIDE_3, None, torch.Generator().manual_seed(0))
    counts = torch.bincount(last, minlength=4).tolist()
    assert counts[0] == 0 and counts[2] == 0
    assert stats.binomtest(counts[1], b, 0.5).pvalue > 1e-3


def test_duplicate_siblings_with_draft_probs_are_refused():
    with pytest.raises(ValueError, match="without replacement"):
        sample_accept(rows(1, 1, 1, 1), torch.tensor([0, 1, 1, 2]), WIDE_3, torch.full((4, V), 0.2))


@pytest.mark.parametrize(
    "probs_shape, tokens_shape, draft_shape, match",
    [
        ((3, V), (4,), None, "one target row and one token per tree node"),
        ((4, V), (3,), None, "one target row and one token per tree node"),
        ((4, V), (4,), (4, V + 1), "draft_probs has shape"),
    ],
)
def test_sample_accept_checks_shapes(probs_shape, tokens_shape, draft_shape, match):
    draft = None if draft_shape is None else torch.full(draft_shape, 0.1)
    with pytest.raises(ValueError, match=match):
        sample_accept(torch.full(probs_shape, 0.2), torch.zeros(tokens_shape, dtype=torch.long), SMALL, draft)


def test_empty_residual_counts_as_acceptance():
    # p(x) rounded just below q(x) with no mass elsewhere: a rejection would leave nothing to draw from.
    p = torch.tensor([[1.0 - 1e-7, 0.0, 0.0]])
    q = torch.tensor([[1.0, 0.0, 0.0]])
    accept, _ = accept_module._speculative_step(p, q, torch.tensor([0]), torch.tensor([0.9999999]))
    assert accept.tolist() == [True]


def test_same_generator_seed_same_result():
    g = torch.Generator().manual_seed(5)
    p = torch.rand(4, V, generator=g).softmax(-1)
    tokens = torch.tensor([0, 1, 2, 3])
    a = sample_accept(p, tokens, SMALL, None, torch.Generator().manual_seed(9))
    b = sample_accept(p, tokens, SMALL, None, torch.Generator().manual_seed(9))
    assert a.path.tolist() == b.path.tolist() and a.bonus.item() == b.bonus.item()


@pytest.mark.parametrize(
    "tree", [chain(4), WIDE, SMALL, build_tree([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])]
)
@pytest.mark.parametrize("seed", range(4))
def test_temperature_zero_sampling_is_greedy(tree, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tree.size, V, generator=g)
    # Distinct siblings: with duplicates, sampling follows the first one accepted, greedy the deepest.
    tokens = distinct_sibling_tokens(tree, logits, g)
    probs = warp_logits(logits, SamplingConfig(temperature=0.0))
    sampled = sample_accept(probs, tokens, tree, None, g)
    greedy = greedy_accept(logits, tokens, tree)
    assert sampled.path.tolist() == greedy.path.tolist() and sampled.bonus.item() == greedy.bonus.item()


# ---------------------------------------------------------------------------------------------
# sample_accept: the emitted tokens follow the target (bigram target and drafter, V = 6)

DRAWS = 100_000
SV = 6
# Root with three children, two of which have children: depth 2, so the first two emitted tokens
# come from one step when the walk gets past depth 1, and from two steps otherwise.
STAT_TREE = build_tree([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0)])
ROOT_TOKEN = 0
WARPS = {
    "plain": SamplingConfig(temperature=1.0),
    "temperature+top_k": SamplingConfig(temperature=0.8, top_k=3),
    "top_p": SamplingConfig(temperature=1.3, top_p=0.9),
    "top_k+top_p": SamplingConfig(temperature=1.5, top_k=4, top_p=0.9),
}
# How far the drafter's logits are from the target's: a close drafter gets deep into the tree, an
# unrelated one has most candidates rejected, which exercises the residuals.
DRAFTER_NOISE = {"close": 1.0, "unrelated": None}
# Deterministic candidates: which of the drafter's top-3 each sibling slot takes.
TOPK_COLUMNS = {"top-k": [0, 1, 2], "top-k with duplicates": [0, 0, 1]}


def bigram_models(
    config: SamplingConfig, drafter: str = "close", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target and drafter as bigram tables [SV, SV] (row = previous token), warped alike."""
    g = torch.Generator().manual_seed(seed)
    target_logits = torch.randn(SV, SV, generator=g) * 1.5
    noise = torch.randn(SV, SV, generator=g)
    scale = DRAFTER_NOISE[drafter]
    draft_logits = noise * 1.5 if scale is None else target_logits + scale * noise
    return warp_logits(target_logits, config), warp_logits(draft_logits, config)


def draft_trees(roots, draft, mode, g):
    """Node tokens [B, T] and draft_probs [B, T, SV] (None for deterministic candidates) of
    STAT_TREE below each root: children drawn from the drafter without replacement, or its top-k."""
    b, t = roots.numel(), STAT_TREE.size
    tokens = torch.zeros(b, t, dtype=torch.long)
    tokens[:, 0] = roots
    draft_probs = torch.zeros(b, t, SV)
    for parent in range(t):  # test set-up: a loop over the 7 nodes
        kids = (STAT_TREE.parents == parent).nonzero().flatten()
        if kids.numel() == 0:
            continue
        q = draft[tokens[:, parent]]  # [B, SV]
        if mode == "sampled":
            assert bool(((q > 0).sum(-1) >= kids.numel()).all()), "drafter support too small for the tree"
            tokens[:, kids] = torch.multinomial(q, kids.numel(), replacement=False, generator=g)
        else:
            tokens[:, kids] = q.topk(3, dim=-1).indices[:, TOPK_COLUMNS[mode][: kids.numel()]]
        draft_probs[:, kids] = q[:, None]
    return tokens, (draft_probs if mode == "sampled" else None)


def emitted(roots, target, draft, mode, g):
    """Tokens one decode step emits below each root [B, depth + 1] (accepted path, then the bonus),
    and how many there are [B]."""
    tokens, draft_probs = draft_trees(roots, draft, mode, g)
    last, bonus = sample_accept_batch(target[tokens], tokens, STAT_TREE, draft_probs, g)
    on_path = STAT_TREE.ancestor_mask[last]  # [B, T]
    n = STAT_TREE.depths[last]  # [B] accepted drafts
    seq = torch.full((roots.numel(), STAT_TREE.max_depth + 1), -1)
    for d in range(1, STAT_TREE.max_depth + 1):
        node = (on_path & (STAT_TREE.depths == d)).long().argmax(1)
        seq[:, d - 1] = torch.where(n >= d, tokens.gather(1, node[:, None]).squeeze(1), -1)
    seq[torch.arange(roots.numel()), n] = bonus
    return seq, n + 1


def first_two_tokens(target, draft, mode, seed):
    """The first two generated tokens [DRAWS, 2], running a second step where the first emitted one."""
    g = torch.Generator().manual_seed(seed)
    seq, count = emitted(torch.full((DRAWS,), ROOT_TOKEN), target, draft, mode, g)
    short = count == 1
    again, _ = emitted(seq[short, 0], target, draft, mode, g)
    seq[short, 1] = again[:, 0]
    return seq[:, :2]


def chi_square_pvalue(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of "samples (category ids) ~ probs"; 0 when an impossible category occurs.
    Categories expected fewer than 5 times are pooled, as the chi-square approximation needs."""
    probs = probs.double().flatten() / probs.double().sum()
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs * samples.numel()
    if counts[expected == 0].sum() > 0:
        return 0.0
    big = expected >= 5
    small = ~big & (expected > 0)
    obs = torch.cat([counts[big], counts[small].sum()[None]]) if small.any() else counts[big]
    exp = torch.cat([expected[big], expected[small].sum()[None]]) if small.any() else expected[big]
    return float(stats.chisquare(obs.numpy(), exp.numpy()).pvalue)


def two_token_pvalues(warp: str, drafter: str, mode: str, seed: int = 0) -> tuple[float, float]:
    """p-values of "first token ~ target" and "first two tokens ~ target's joint"."""
    target, draft = bigram_models(WARPS[warp], drafter)
    toks = first_two_tokens(target, draft, mode, seed)
    first = target[ROOT_TOKEN]  # [SV]
    joint = first[:, None] * target  # [SV, SV]: p(a) p(b | a)
    return chi_square_pvalue(toks[:, 0], first), chi_square_pvalue(toks[:, 0] * SV + toks[:, 1], joint)


@pytest.mark.parametrize("mode", ["sampled", "top-k", "top-k with duplicates"])
@pytest.mark.parametrize("drafter", list(DRAFTER_NOISE))
@pytest.mark.parametrize("warp", list(WARPS))
def test_sampled_tokens_follow_the_target(warp, drafter, mode):
    p_first, p_joint = two_token_pvalues(warp, drafter, mode)
    assert p_first > ALPHA and p_joint > ALPHA, (p_first, p_joint)


def accept_whenever_possible(p, q, x, u):
    """Broken: accepts any candidate the target can produce at all."""
    _, residual = CORRECT_STEP(p, q, x, u)
    return p.gather(1, x[:, None]).squeeze(1) > 0, residual


def skip_the_residual(p, q, x, u):
    """Broken: after a rejection, keeps drawing from the unchanged target."""
    accept, _ = CORRECT_STEP(p, q, x, u)
    return accept, p


def draft_with_replacement(draft_probs, node, x, tried):
    """Broken (for siblings drawn without replacement): forgets that earlier siblings were excluded."""
    return CORRECT_PROPOSAL(draft_probs, node, x, torch.zeros_like(tried))


CORRECT_STEP = accept_module._speculative_step
CORRECT_PROPOSAL = accept_module._proposal


@pytest.mark.parametrize(
    "name, broken, mode",
    [
        ("_speculative_step", accept_whenever_possible, "sampled"),
        ("_speculative_step", accept_whenever_possible, "top-k"),
        ("_speculative_step", skip_the_residual, "sampled"),
        ("_speculative_step", skip_the_residual, "top-k"),
        ("_proposal", draft_with_replacement, "sampled"),
    ],
)
def test_the_statistical_test_rejects_broken_samplers(monkeypatch, name, broken, mode):
    monkeypatch.setattr(accept_module, name, broken)
    p_first, p_joint = two_token_pvalues("plain", "close", mode)
    assert min(p_first, p_joint) < ALPHA, (p_first, p_joint)


# ---------------------------------------------------------------------------------------------
# typical_accept (lossy)


@pytest.mark.parametrize("tree", [chain(3), WIDE, build_tree([(0,), (1,), (0, 0), (0, 1), (1, 0)])])
@pytest.mark.parametrize("seed", range(3))
def test_typical_at_temperature_zero_is_greedy(tree, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tree.size, V, generator=g)
    tokens = distinct_sibling_tokens(tree, logits, g)
    typical = typical_accept(logits, tokens, tree, temperature=0.0)
    greedy = greedy_accept(logits, tokens, tree)
    assert typical.path.tolist() == greedy.path.tolist() and typical.bonus.item() == greedy.bonus.item()


def probs_rows(*dists) -> torch.Tensor:
    return torch.tensor(dists).log()


def test_typical_accepts_likely_enough_tokens():
    # Root distribution: entropy ~1.0 nats, so the threshold is min(0.09, 0.3 * e^-1.0) ~ 0.09.
    # Node 1 (token 1, p = .3) passes; node 3 (token 2, p = .05 at node 1) does not.
    root = [0.55, 0.3, 0.1, 0.05, 0.0]
    logits = probs_rows(root, [0.7, 0.2, 0.05, 0.05, 0.0], [0.2] * 5, [0.2] * 5)
    out = typical_accept(logits, torch.tensor([0, 1, 4, 2]), SMALL, temperature=1.0)
    assert out.path.tolist() == [0, 1]


def test_typical_breaks_length_ties_by_likelihood():
    # Both depth-1 children pass; the later one is more likely and wins.
    logits = probs_rows([0.0, 0.3, 0.7, 0.0, 0.0], [0, 0, 0, 0, 1.0], [0, 0, 0, 1.0, 0])
    out = typical_accept(logits, torch.tensor([0, 1, 2]), build_tree([(0,), (1,)]), temperature=1.0)
    assert out.path.tolist() == [0, 2] and out.bonus.item() == 3


def test_typical_rejects_negative_temperature():
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        typical_accept(torch.zeros(4, V), torch.zeros(4, dtype=torch.long), SMALL, temperature=-1.0)


def test_probabilities_in_the_test_tables_are_what_they_claim():
    # Guards the statistical tests' set-up: every warped bigram row is a distribution.
    for config in WARPS.values():
        for drafter in DRAFTER_NOISE:
            target, draft = bigram_models(config, drafter)
            for table in (target, draft):
                assert torch.allclose(table.sum(-1), torch.ones(SV)) and not math.isnan(float(table.sum()))
