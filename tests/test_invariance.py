"""Row invariance: every tree node of a verify forward computes, bit for bit, what one-token
decoding computes at that node (selfspec.invariance, the "exact" verification of selfspec.hf).

Property-style over random trees on tiny random-weight models in bf16 (where a batched forward
visibly breaks the rule), plus the row-exact linear on its own. The default model's case is in
tests/test_default_model.py."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from selfspec.invariance import RowExactLinear, row_invariant, variant_linear_shapes
from selfspec.tree import build_tree, chain, tree_from_parents
from tests.conftest import node_mismatches

ARCHS = ["llama", "qwen2", "mistral", "gemma", "llama-wide-mlp"]
TREES = {
    "chain": chain(5),
    "wide": build_tree([(k,) for k in range(7)]),
    "deep": build_tree([(0,) * d for d in range(1, 7)] + [(1,), (1, 0), (0, 1), (0, 0, 1)]),
    "mixed": tree_from_parents([-1, 0, 0, 1, 1, 2, 3, 3, 4, 6, 6, 9, 0, 12, 13, 5]),
}


def _case(model, tree, seed):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (11,), generator=g)
    return prompt, torch.randint(0, model.config.vocab_size, (tree.size,), generator=g)


@pytest.mark.parametrize("tree_name", sorted(TREES))
@pytest.mark.parametrize("arch", ARCHS)
def test_every_node_equals_one_token_decoding_bf16(tiny_models, arch, tree_name):
    model, tree = tiny_models(arch, torch.bfloat16), TREES[tree_name]
    prompt, tokens = _case(model, tree, seed=len(tree_name))
    assert node_mismatches(model, prompt, tree, tokens) == []


@settings(max_examples=12, deadline=None)
@given(parents=st.lists(st.integers(0, 10_000), min_size=1, max_size=20), seed=st.integers(0, 1000))
def test_random_trees_bf16(tiny_models, parents, seed):
    """Any parents array (node i hangs below a random earlier node), on the GQA Llama."""
    tree = tree_from_parents([-1] + [p % (i + 1) for i, p in enumerate(parents)])
    model = tiny_models("llama-wide-mlp", torch.bfloat16)
    prompt, tokens = _case(model, tree, seed)
    assert node_mismatches(model, prompt, tree, tokens) == []


def test_batched_verification_is_not_bitwise_in_bf16(tiny_models):
    """The power of the tests above: the batched forward (one masked attention call, multi-row
    GEMMs) does not give every node its one-token bits, so a lost exact path would be caught."""
    model = tiny_models("llama", torch.bfloat16)
    differing = 0
    for seed, tree in enumerate(TREES.values()):
        prompt, tokens = _case(model, tree, seed)
        differing += len(node_mismatches(model, prompt, tree, tokens, exact=False))
    assert differing > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp64_exact_and_batched_agree_on_tokens(tiny_models, arch):
    """In fp64 both modes are exact per node on these shapes (fp64 GEMMs here are row-invariant
    or handled row by row), which the greedy-equality tests elsewhere rely on."""
    model, tree = tiny_models(arch), TREES["mixed"]
    prompt, tokens = _case(model, tree, seed=3)
    assert node_mismatches(model, prompt, tree, tokens) == []


@pytest.mark.parametrize("rows", [2, 5, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_exact_linear_gives_each_row_its_one_row_result(rows, dtype):
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(96, 1536, generator=g) * 0.03).to(dtype)
    b = torch.randn(96, generator=g).to(dtype)
    x = torch.randn(rows, 1536, generator=g).to(dtype)
    one = torch.cat([F.linear(x[i : i + 1], w, b) for i in range(rows)])
    with RowExactLinear(frozenset({(96, 1536)})):
        out = F.linear(x, w, b)
        out3 = F.linear(x.view(1, rows, 1536), w, b)  # [B, T, K] as decoder layers pass it
    assert torch.equal(out, one) and torch.equal(out3[0], one)


def test_row_exact_linear_leaves_other_shapes_and_ops_alone():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with RowExactLinear(frozenset({(5, 8)})):
        assert torch.equal(F.linear(x, w), x @ w.T) or torch.allclose(F.linear(x, w), x @ w.T)
        assert torch.equal(torch.relu(x), x.clamp(min=0))


def test_probe_is_cached_and_the_shape_set_matches_it(tiny_models):
    model = tiny_models("llama-wide-mlp", torch.bfloat16)
    shapes = variant_linear_shapes(model)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            n, k = module.weight.shape
            invariant = row_invariant(n, k, module.bias is not None, module.weight.dtype, module.weight.device)
            assert ((n, k) in shapes) == (not invariant)
