"""The CPU attention kernel (selfspec.kernels.cpu_attention) against the library call it stands in
for: torch's one-query SDPA, as transformers' sdpa_attention_forward makes it in a decode step.

Every tree node's output must be bitwise that call over the node's own keys (the prefix, then
its ancestors); the check the engine runs at load time is tested for both answers."""

import types
from pathlib import Path

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from selfspec import hf
from selfspec.kernels import cpu_attention

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="CPU attention kernel unavailable here")

# Whether torch's one-query SDPA on this CPU reduces in the order the kernel reproduces (probed on
# the AMD EPYC Zen 5 dev machine). It does not on an Intel Xeon with AMX (torch 2.13): there the
# engine's load-time check refuses the kernel, which the last two tests check on every machine;
# the bitwise comparisons below can only hold where the orders agree.
ORDER_HERE = cpu_attention.available() and hf._kernel_matches_sdpa(9, 3, 64, 0.125, 3)
same_order = pytest.mark.skipif(
    not ORDER_HERE,
    reason="torch's CPU attention on this CPU reduces in another order than the kernel's; "
    "the engine refuses the kernel here (tested below)",
)


def _reference(q, k, v, rows, scale, groups):
    module = types.SimpleNamespace(is_causal=True, training=False, num_key_value_groups=groups)
    out, _ = sdpa_attention_forward(
        module, q[None, :, None], k[None][:, :, rows], v[None][:, :, rows], None, 0.0, scale
    )
    return out[0, 0]


def _tree(parents, prefix):
    anc = []
    for i, p in enumerate(parents):
        anc.append(([] if p < 0 else anc[p]) + [prefix + i])
    width = max(len(a) for a in anc)
    rows = torch.tensor([a + [a[-1]] * (width - len(a)) for a in anc])
    return anc, rows, torch.tensor([len(a) for a in anc])


@same_order
@pytest.mark.parametrize("prefix", [0, 3, 16, 200, 511, 600, 1300])
@pytest.mark.parametrize("heads", [(9, 3), (4, 4), (8, 1)])
def test_every_node_is_bitwise_the_one_query_sdpa_call(prefix, heads):
    hq, hkv = heads
    g = torch.Generator().manual_seed(prefix * 31 + hq)
    parents = [-1, 0, 0, 1, 1, 2, 5, 6, 0]
    anc, rows, widths = _tree(parents, prefix)
    total = prefix + len(parents)
    k = (torch.randn(hkv, total + 4, 64, generator=g) * 2).bfloat16()  # a cache longer than what is used
    v = torch.randn(hkv, total + 4, 64, generator=g).bfloat16()
    q = torch.randn(len(parents), hq, 64, generator=g).bfloat16()
    out = cpu_attention.tree_attention(q, k, v, prefix, rows, widths, 0.125)
    for i, a in enumerate(anc):
        keys = torch.cat([torch.arange(prefix), torch.tensor(a)])
        assert torch.equal(out[i], _reference(q[i], k, v, keys, 0.125, hq // hkv)), f"node {i}"


@same_order
@pytest.mark.parametrize("d", [48, 80, 128, 256])
def test_head_sizes_and_a_wide_tree_across_a_block_boundary(d):
    """Head sizes that leave a remainder after the kernel's 64-column p.V slices (48, 80), two
    that do not, and 40 nodes whose keys straddle the 512-key block boundary (prefix 500): the
    shared 16-key tiles end part-filled and the ancestors spill into the next block."""
    g = torch.Generator().manual_seed(d)
    parents = [-1] + [max(0, i - 1 - (i % 3)) for i in range(1, 40)]
    prefix = 500
    anc, rows, widths = _tree(parents, prefix)
    total = prefix + len(parents)
    k = (torch.randn(2, total, d, generator=g) * 2).bfloat16()
    v = torch.randn(2, total, d, generator=g).bfloat16()
    q = torch.randn(len(parents), 6, d, generator=g).bfloat16()
    out = cpu_attention.tree_attention(q, k, v, prefix, rows, widths, d**-0.5)
    for i, a in enumerate(anc):
        keys = torch.cat([torch.arange(prefix), torch.tensor(a)])
        assert torch.equal(out[i], _reference(q[i], k, v, keys, d**-0.5, 3)), f"node {i}"


def _one_position(q, k, v, scale):
    none = torch.zeros(1, 0, dtype=torch.int64)
    return cpu_attention.tree_attention(q, k, v, k.shape[1], none, torch.zeros(1, dtype=torch.int64), scale)[
        0
    ]


@same_order
def test_bitwise_on_cancelling_outputs_at_every_tail_length():
    """Outputs that cancel to a few ulps of their terms expose any difference in summation order
    (plain random inputs flip a bf16 output about once in 65k and hid a wrong order for the last
    1-3 keys of a block, which real decoding then found). Every key count up to 140 covers every
    tail of the 4-key p.V groups and the 16-key exp chunks; 509-517 and 1022-1027 cross blocks."""
    g = torch.Generator().manual_seed(11)
    for length in [*range(1, 141), *range(509, 518), *range(1022, 1028)]:
        q, k, v = cpu_attention.cancelling_case(9, 3, 64, length, 0.125, g)
        ref = _reference(q[0], k, v, torch.arange(length), 0.125, 3)
        assert torch.equal(_one_position(q, k, v, 0.125), ref), f"{length} keys"


def test_cancelling_case_cancels():
    """The check's inputs are only sensitive if their outputs are far smaller than their terms."""
    g = torch.Generator().manual_seed(3)
    q, k, v = cpu_attention.cancelling_case(9, 3, 64, 200, 0.125, g)
    out = _reference(q[0], k, v, torch.arange(200), 0.125, 3).float()
    assert out[::3].abs().median() < v.float().abs().median() / 64  # each group's first head cancels


@same_order
def test_the_captured_decoding_case_is_bitwise():
    """One decode step's attention inputs from the default model (63 keys, 9 heads) on which an
    earlier kernel differed from the library by one ulp in one output (benchmarks/cases)."""
    case = Path(__file__).parents[1] / "benchmarks" / "cases" / "attention_divergence_63keys.pt"
    q, k, v, scale = torch.load(case)
    ref = _reference(q[0], k, v, torch.arange(k.shape[1]), scale, 3)
    assert torch.equal(_one_position(q, k, v, scale), ref)


@same_order
def test_head_size_128_and_another_scale():
    g = torch.Generator().manual_seed(5)
    k = torch.randn(2, 700, 128, generator=g).bfloat16()
    v = torch.randn(2, 700, 128, generator=g).bfloat16()
    q = torch.randn(1, 4, 128, generator=g).bfloat16()
    none = torch.zeros(1, 0, dtype=torch.int64)
    out = cpu_attention.tree_attention(q, k, v, 700, none, torch.zeros(1, dtype=torch.int64), 0.0884)
    assert torch.equal(out[0], _reference(q[0], k, v, torch.arange(700), 0.0884, 2))


def test_bad_arguments_are_refused():
    k = torch.zeros(3, 10, 64).bfloat16()
    with pytest.raises(ValueError, match="tree_attention"):
        cpu_attention.tree_attention(
            torch.zeros(1, 9, 64),
            k,
            k,
            10,
            torch.zeros(1, 0, dtype=torch.int64),
            torch.zeros(1, dtype=torch.int64),
            0.125,
        )  # fp32 query
    with pytest.raises(ValueError, match="tree_attention"):
        cpu_attention.tree_attention(
            torch.zeros(1, 8, 64).bfloat16(),
            k,
            k,
            10,
            torch.zeros(1, 0, dtype=torch.int64),
            torch.zeros(1, dtype=torch.int64),
            0.125,
        )  # 8 heads over 3 K/V heads


@same_order
def test_load_time_check_passes_where_the_orders_agree():
    assert hf._kernel_matches_sdpa(9, 3, 64, 0.125, 3)
    assert hf._kernel_matches_sdpa(4, 4, 64, 0.125, 1)


def test_load_time_check_rejects_a_kernel_that_differs(monkeypatch):
    """The engine uses the kernel only after ``_kernel_matches_sdpa``; a kernel off by one ulp
    somewhere must fail that check (so the engine keeps SDPA)."""
    real = cpu_attention.tree_attention

    def off_by_one_ulp(*args, **kwargs):
        out = real(*args, **kwargs)
        out.view(torch.int16)[..., 0] += 1
        return out

    monkeypatch.setattr(cpu_attention, "tree_attention", off_by_one_ulp)
    assert not hf._kernel_matches_sdpa(9, 3, 64, 0.125, 3)


def test_engine_steps_use_the_kernel_unless_turned_off_and_where_it_was_checked(monkeypatch):
    module = types.SimpleNamespace(training=False, num_key_value_groups=3)
    q = torch.zeros(1, 9, 1, 64).bfloat16()
    monkeypatch.setattr(hf, "_KERNEL_CHECKED", {})
    monkeypatch.setenv("SELFSPEC_CPU_ATTENTION", "0")
    assert not hf.cpu_kernel_attention(module, q, 0.125)  # turned off by the user
    monkeypatch.delenv("SELFSPEC_CPU_ATTENTION")
    assert hf.cpu_kernel_attention(module, q, 0.125) == ORDER_HERE  # on by default where it was checked
    assert not hf.cpu_kernel_attention(module, q.float(), 0.125)  # fp32: not this kernel's
    assert not hf.cpu_kernel_attention(types.SimpleNamespace(training=True, num_key_value_groups=3), q, 0.125)
    monkeypatch.setattr(hf, "_KERNEL_CHECKED", {})
    monkeypatch.setattr(hf, "_kernel_matches_sdpa", lambda *a: False)
    assert not hf.cpu_kernel_attention(module, q, 0.125)
