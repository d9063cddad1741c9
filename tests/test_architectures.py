"""Model families whose attention has per-layer options (sliding windows, soft-capping, sinks):
tree verification must reproduce exactly what each layer computes in plain decoding, so greedy
output equals transformers' own ``generate`` (eager or SDPA, whichever the model uses)."""

import pytest
import torch

import selfspec
from selfspec.hf import check_supported
from selfspec.tree import build_tree
from tests.helpers import FAMILIES, OracleDrafter, hf_greedy, randomized

ARCHS = ["mistral-window", "qwen2-window", "gemma3", "gemma2", "gpt-oss"]


def _dtype(arch):
    return torch.float32 if arch in ("gpt-oss", "qwen2-moe") else torch.float64  # expert matmuls take no fp64


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_model_families_match_hf(tiny_models, arch):
    """Other attention layouts (QK norms, partial rotary, fused QKV, learned positions, MoE, MHA):
    a tree whose kept paths skip nodes, then a dynamic tree from a real (random) drafter."""
    model = tiny_models(arch, _dtype(arch))
    check_supported(model)
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(30))
    ref = hf_greedy(model, ids, 16)
    oracle = OracleDrafter(model, ref, ids.shape[1], rank=1)
    tree = build_tree([(r,) for r in range(2)] + [(r, s) for r in range(2) for s in range(2)])
    out = selfspec.generate(model, ids, drafter=oracle, tree=tree, max_new_tokens=16, eos_token_id=[])
    assert torch.equal(out.sequences, ref) and out.stats.mean_accepted_length > 2.5
    drafter = randomized(selfspec.new_drafter("eagle", model), seed=35)
    out = selfspec.generate(model, ids, drafter=drafter, tree="dynamic", max_new_tokens=16, eos_token_id=[])
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_supported_and_windows_cut(tiny_models, arch):
    model = tiny_models(arch, _dtype(arch))
    check_supported(model)  # sliding layers are accepted
    assert model.config.sliding_window == 5  # < prompt + new tokens below: the window binds


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rank", [0, 1])
def test_oracle_trees_match_hf(tiny_models, arch, rank):
    """Long accepted paths (rank 0) and paths that skip nodes (rank 1) over a prefix longer than the
    window: any wrong window edge, cap or sink share changes a logit and breaks equality."""
    model = tiny_models(arch, _dtype(arch))
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(31))
    ref = hf_greedy(model, ids, 20)
    drafter = OracleDrafter(model, ref, ids.shape[1], rank=rank)
    tree = build_tree(
        [(r,) for r in range(2)] + [(r, s) for r in range(2) for s in range(2)] + [(rank, rank, 0)]
    )
    out = selfspec.generate(model, ids, drafter=drafter, tree=tree, max_new_tokens=20, eos_token_id=[])
    assert torch.equal(out.sequences, ref)
    assert out.stats.mean_accepted_length > 2.5  # the oracle's paths were kept, not just bonus tokens


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", [None, "eagle3"])
def test_dynamic_trees_match_hf(tiny_models, arch, kind):
    model = tiny_models(arch, _dtype(arch))
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(32))
    ref = hf_greedy(model, ids, 16)
    drafter = randomized(selfspec.new_drafter(kind, model), seed=33) if kind else None
    out = selfspec.generate(model, ids, drafter=drafter, tree="dynamic", max_new_tokens=16, eos_token_id=[])
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("arch", ["gemma3", "gpt-oss"])
def test_triton_backend_falls_back_per_layer(tiny_models, monkeypatch, arch):
    """SELFSPEC_ATTENTION=triton: full layers go through the kernel; windowed, capped or sink layers
    take the torch path (the kernel has none of these); the output still equals HF's."""
    from selfspec.kernels import tree_attention as tree_kernel

    if not tree_kernel.HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("SELFSPEC_ATTENTION", "triton")
    model = tiny_models(arch, torch.float32)
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(34))
    ref = hf_greedy(model, ids, 12)
    calls = []
    real = tree_kernel.tree_attention
    monkeypatch.setattr(tree_kernel, "tree_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    drafter = OracleDrafter(model, ref, ids.shape[1], rank=0)
    out = selfspec.generate(
        model, ids, drafter=drafter, tree=build_tree([(0,), (1,), (0, 0)]), max_new_tokens=12, eos_token_id=[]
    )
    assert torch.equal(out.sequences, ref)
    assert calls if arch == "gemma3" else not calls  # gpt-oss: every layer has sinks


def test_unsupported_layer_types_are_refused(tiny_models):
    model = tiny_models("gemma3")
    model.config.layer_types = ["linear_attention", "full_attention"]
    try:
        with pytest.raises(ValueError, match="linear_attention layers"):
            check_supported(model)
    finally:
        model.config.layer_types = ["sliding_attention", "full_attention"]


def test_model_without_attention_interface_is_refused_by_generate(tiny_models):
    """StableLM computes attention inline: a tree mask could not reach it, so generate() refuses it
    up front instead of returning a wrong continuation (also for models not loaded by load_target)."""
    model = tiny_models("stablelm")
    with pytest.raises(ValueError, match="AttentionInterface"):
        selfspec.generate(model, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=3)


def test_a_position_bias_inside_attention_is_refused_in_a_tree():
    """No supported family passes one today; should one appear, verification must stop, not guess."""
    from selfspec.hf import TreeMask, tree_attention_forward
    from selfspec.tree import chain

    q, kv = torch.zeros(1, 2, 3, 8), torch.zeros(1, 1, 5, 8)
    tree = TreeMask(chain(2).ancestor_mask, "torch")
    with pytest.raises(ValueError, match="position bias"):
        tree_attention_forward(
            torch.nn.Module(), q, kv, kv, None, selfspec_tree=tree, position_bias=torch.zeros(1, 2, 3, 5)
        )
