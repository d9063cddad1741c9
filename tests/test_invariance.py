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

from selfspec import hf
from selfspec.invariance import (
    TRANSPOSED,
    kernel_block,
    plan_for,
    row_exact_scope,
    row_invariant,
    transposed_matches,
    variant_linear_shapes,
)
from selfspec.kernels import cpu_linear
from selfspec.tree import build_tree, chain, tree_from_parents
from tests.helpers import node_mismatches

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


def _plans_for(layer, dtype):
    """Every plan row_exact may use for ``layer`` here: one call per row (None), the transposed
    call where it matches, the kernel's measured block where one matches."""
    args = (*layer.weight.shape, layer.bias is not None, dtype, layer.weight.device)
    block = kernel_block(*args)
    return (
        [None] + ([TRANSPOSED] if transposed_matches(*args) else []) + ([block] if block is not None else [])
    )


@pytest.mark.parametrize("rows", [2, 5, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_exact_linear_gives_each_row_its_one_row_result(rows, dtype):
    """Every way of computing a planned layer (one call per row; the transposed call or the blocked
    kernel, where the probe found them to match) gives every row its one-row result, on inputs
    other than the probe's."""
    g = torch.Generator().manual_seed(100 + rows)
    layer = torch.nn.Linear(1536, 96).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(96, 1536, generator=g) * 0.03)
        layer.bias.copy_(torch.randn(96, generator=g))
    w, b = layer.weight, layer.bias
    x = torch.randn(rows, 1536, generator=g).to(dtype)
    one = torch.cat([F.linear(x[i : i + 1], w, b) for i in range(rows)])
    for block in _plans_for(layer, dtype):
        with torch.no_grad(), row_exact_scope({layer: block}):
            out = layer(x)
            out3 = layer(x.view(1, rows, 1536))  # [B, T, K] as decoder layers pass it
        assert torch.equal(out, one) and torch.equal(out3[0], one), f"block={block}"


@pytest.mark.parametrize("n, k", [(576, 1536), (1536, 576), (49152, 576)])
def test_the_default_models_shapes_get_a_one_call_plan(n, k):
    """On the CPUs we run on (AMD Zen 5: the blocked kernel; Intel Xeon with AMX: the transposed
    call), a bf16 shape of the default model that is not row-invariant gets a plan computing all
    rows in one call; one call per row would make verification T times the work."""
    cpu = torch.device("cpu")
    if row_invariant(n, k, False, torch.bfloat16, cpu):
        pytest.skip("this shape is row-invariant with this library and thread count; nothing to replace")
    if not transposed_matches(n, k, False, torch.bfloat16, cpu) and not cpu_linear.available():
        pytest.skip(f"blocked CPU linear unavailable here: {cpu_linear.unavailable_reason()}")
    assert plan_for(n, k, False, torch.bfloat16, cpu) is not None


def test_transposed_call_chunks_rows_beyond_the_probed_counts():
    """More rows than the probe covered go through the transposed call in probed-size chunks, and
    still equal the one-row results where the transposed plan matches."""
    cpu = torch.device("cpu")
    layer = torch.nn.Linear(576, 192, bias=False).bfloat16()
    if not transposed_matches(192, 576, False, torch.bfloat16, cpu):
        pytest.skip("the transposed call does not reproduce one-row calls on this CPU")
    x = torch.randn(150, 576).bfloat16()
    with torch.no_grad():
        one = torch.cat([layer(x[i : i + 1]) for i in range(150)])
        with row_exact_scope({layer: TRANSPOSED}):
            assert torch.equal(layer(x), one)


def test_row_exact_scope_leaves_other_layers_and_ops_alone_and_cleans_up():
    planned, other = torch.nn.Linear(8, 5), torch.nn.Linear(8, 3)
    x = torch.randn(4, 8)
    with torch.no_grad():
        expected = other(x)
        with row_exact_scope({planned: None}):
            assert torch.equal(other(x), expected)
            assert torch.equal(torch.relu(x), x.clamp(min=0))
            planned(x)
        assert not planned._forward_pre_hooks and not planned._forward_hooks
        # An exception inside the planned layer leaves no mode on the stack and no hook behind.
        with pytest.raises(RuntimeError), row_exact_scope({planned: None}):
            planned(torch.randn(4, 7))
        assert not planned._forward_pre_hooks and not planned._forward_hooks
        assert not torch.overrides._get_current_function_mode_stack()


def test_blocked_kernel_follows_its_stated_order():
    """The C kernel against an fp32 emulation of the order its source states (K-blocks from zero,
    per pair the odd product added first, block sums left to right, bias, one rounding): the
    kernel's own semantics, independent of any library."""
    if not cpu_linear.available():
        pytest.skip(f"blocked CPU linear unavailable here: {cpu_linear.unavailable_reason()}")
    g = torch.Generator().manual_seed(7)
    n, k, rows = 37, 40, 5  # N not a multiple of 16, K not a multiple of the block
    w = (torch.randn(n, k, generator=g) * 0.3).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    x = torch.randn(rows, k, generator=g).bfloat16()
    packed = cpu_linear.pack(w)
    for block in (4, 16, 40):
        xf, wf = x.float(), w.float()
        total = None
        for lo in range(0, k, block):
            acc = torch.zeros(rows, n)
            for p in range(lo, min(k, lo + block), 2):
                acc = acc + xf[:, p + 1, None] * wf[None, :, p + 1]  # bf16 products are exact in fp32
                acc = acc + xf[:, p, None] * wf[None, :, p]
            total = acc if total is None else total + acc
        expected = (total + b.float()).bfloat16()
        assert torch.equal(cpu_linear.blocked_linear(x, packed, n, block, b), expected), f"block={block}"


def test_blocked_kernel_refuses_bad_input():
    if not cpu_linear.available():
        pytest.skip(f"blocked CPU linear unavailable here: {cpu_linear.unavailable_reason()}")
    with pytest.raises(ValueError, match="even K"):
        cpu_linear.pack(torch.randn(4, 5).bfloat16())
    with pytest.raises(ValueError, match="bf16"):
        cpu_linear.pack(torch.randn(4, 6))
    packed = cpu_linear.pack(torch.randn(4, 6).bfloat16())
    with pytest.raises(ValueError, match="block"):
        cpu_linear.blocked_linear(torch.randn(2, 6).bfloat16(), packed, 4, 3)
    with pytest.raises(ValueError, match="packed weight's K"):
        cpu_linear.blocked_linear(torch.randn(2, 8).bfloat16(), packed, 4, 4)


def test_probe_is_cached_and_the_shape_set_matches_it(tiny_models):
    model = tiny_models("llama-wide-mlp", torch.bfloat16)
    shapes = variant_linear_shapes(model)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            n, k = module.weight.shape
            invariant = row_invariant(
                n, k, module.bias is not None, module.weight.dtype, module.weight.device
            )
            assert ((n, k) in shapes) == (not invariant)


@pytest.mark.parametrize("arch", ["llama", "llama-wide-mlp"])
def test_the_sdpa_fallback_is_exact_too(tiny_models, arch, monkeypatch):
    """Where the CPU attention kernel is not used (other CPUs, fp32, shapes it fails its check on),
    per-depth SDPA over each node's own keys keeps every node exact."""
    from selfspec import hf

    monkeypatch.setattr(hf, "cpu_kernel_attention", lambda *args: False)
    model, tree = tiny_models(arch, torch.bfloat16), TREES["mixed"]
    prompt, tokens = _case(model, tree, seed=11)
    assert node_mismatches(model, prompt, tree, tokens) == []


@pytest.mark.parametrize("switch", ["1", "0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_node_exact_with_and_without_the_cpu_attention_kernel(tiny_models, arch, switch, monkeypatch):
    """bf16 on CPU the tree runs through the CPU attention kernel (the default, where it is
    available); SELFSPEC_CPU_ATTENTION=0 keeps per-depth SDPA. Both are exact."""
    from selfspec.kernels import cpu_attention

    if switch == "1" and not cpu_attention.available():
        pytest.skip(f"CPU attention kernel unavailable: {cpu_attention.unavailable_reason()}")
    monkeypatch.setenv("SELFSPEC_CPU_ATTENTION", switch)
    calls = []
    real = cpu_attention.tree_attention
    monkeypatch.setattr(cpu_attention, "tree_attention", lambda *a: calls.append(1) or real(*a))
    model, tree = tiny_models(arch, torch.bfloat16), TREES["mixed"]
    prompt, tokens = _case(model, tree, seed=12)
    assert node_mismatches(model, prompt, tree, tokens) == []
    # where torch's attention here reduces in another order, the load-time check refuses the kernel
    attn = model.model.layers[0].self_attn
    q = torch.zeros(1, model.config.num_attention_heads, 1, attn.head_dim).bfloat16()
    accepted = hf.cpu_kernel_attention(attn, q, attn.scaling)
    assert bool(calls) == (switch == "1" and accepted)


@pytest.mark.skipif(not cpu_linear.available(), reason="blocked CPU linear unavailable here")
def test_fast_layers_give_one_row_calls_the_library_bits_through_the_kernel(monkeypatch):
    """A decode step may run row-invariant layers through the blocked kernel (faster on small row
    counts): only where the kernel reproduces the library's one-row call, only up to the rows it
    was timed faster for, and bitwise the library's result."""
    from selfspec import invariance

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(576, 192), torch.nn.Linear(192, 64, bias=True)).bfloat16()
    monkeypatch.setattr(invariance, "kernel_rows", lambda *args: 4)  # timing is the next test's
    fast = invariance.fast_layers(model)
    shapes = {tuple(m.weight.shape) for m in fast}
    assert (192, 576) in shapes  # K = 576: the default model's q/k/v/gate/up/lm_head reduction
    calls = []
    real = cpu_linear.blocked_linear
    monkeypatch.setattr(
        cpu_linear, "blocked_linear", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k)
    )
    layer = model[0]
    for rows in (1, 3, 8):
        x = torch.randn(rows, 576).bfloat16()
        with torch.no_grad(), row_exact_scope({}, fast):
            out = layer(x)
        one = torch.cat([F.linear(x[i : i + 1], layer.weight, layer.bias) for i in range(rows)])
        assert torch.equal(out, one), f"{rows} rows"
    assert [s[0] for s in calls if s[-1] == 576] == [1, 3]  # 8 rows > the 4 timed faster: the library


@pytest.mark.skipif(not cpu_linear.available(), reason="blocked CPU linear unavailable here")
def test_kernel_rows_is_zero_where_the_library_is_faster(monkeypatch):
    import time

    from selfspec import invariance

    real, real_linear = cpu_linear.blocked_linear, F.linear

    def slow(*args, **kwargs):
        time.sleep(0.002)
        return real(*args, **kwargs)

    monkeypatch.setattr(invariance, "_FAST", {})
    monkeypatch.setattr(cpu_linear, "blocked_linear", slow)
    assert invariance.kernel_rows(64, 576, False, torch.bfloat16, torch.device("cpu")) == 0
    monkeypatch.setattr(invariance, "_FAST", {})
    monkeypatch.setattr(cpu_linear, "blocked_linear", real)
    monkeypatch.setattr(invariance.F, "linear", lambda *a, **k: time.sleep(0.002) or real_linear(*a, **k))
    assert (
        invariance.kernel_rows(64, 576, False, torch.bfloat16, torch.device("cpu"))
        == invariance.FAST_ROWS[-1]
    )
