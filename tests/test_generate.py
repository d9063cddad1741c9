"""The engine's central promise: greedy output is the target's own greedy output, token for token."""

import pytest
import torch

import selfspec
from selfspec.tree import build_tree, chain
from tests.helpers import OracleDrafter, hf_greedy, randomized

TREES = {
    "single": build_tree([]),
    "chain": chain(4),
    "wide": build_tree([(k,) for k in range(8)]),
    "deep": build_tree([(0,) * d for d in range(1, 7)] + [(1,), (1, 0), (0, 1), (0, 0, 1)]),
}


@pytest.mark.parametrize("arch", ["llama", "llama-mha", "qwen2", "mistral"])
@pytest.mark.parametrize("kind", [None, "medusa", "eagle", "eagle3", "block"])
def test_greedy_matches_hf_random_drafters(tiny_models, arch, kind):
    model = tiny_models(arch)
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    ref = hf_greedy(model, ids, 48)
    drafter = randomized(selfspec.new_drafter(kind, model), seed=2) if kind else None
    out = selfspec.generate(model, ids, drafter=drafter, max_new_tokens=48, eos_token_id=[])
    assert torch.equal(out.sequences, ref)
    assert out.stats.new_tokens == 48


@pytest.mark.parametrize("tree_name", sorted(TREES))
@pytest.mark.parametrize("kind", ["medusa", "eagle", "eagle3", "block"])
def test_greedy_matches_hf_over_tree_shapes(tiny_models, tree_name, kind):
    model = tiny_models("llama")
    tree = TREES[tree_name]
    depth = max(tree.max_depth, 1)
    config = {"medusa": {"num_heads": depth}, "block": {"block_depths": depth}}.get(kind, {})
    drafter = randomized(selfspec.new_drafter(kind, model, **config), seed=3)
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(4))
    ref = hf_greedy(model, ids, 40)
    out = selfspec.generate(model, ids, drafter=drafter, tree=tree, max_new_tokens=40, eos_token_id=[])
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("rank", [0, 1, 2])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_oracle_drafts_are_accepted_and_committed(tiny_models, arch, rank):
    """Right tokens at rank 0 make chains; at rank 1 or 2 the kept path jumps over nodes."""
    model = tiny_models(arch)
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(5))
    ref = hf_greedy(model, ids, 60)
    drafter = OracleDrafter(model, ref, ids.shape[1], rank)
    tree = build_tree(
        [(r,) for r in range(3)] + [(r, s) for r in range(3) for s in range(3)] + [(rank, rank, rank)]
    )
    out = selfspec.generate(model, ids, drafter=drafter, tree=tree, max_new_tokens=60, eos_token_id=[])
    assert torch.equal(out.sequences, ref)
    # every step keeps the full depth (3 drafted + bonus) except possibly at the very end
    assert out.stats.mean_accepted_length > 3.5
    assert out.stats.accepted_by_depth[2] > 0.9


@pytest.mark.parametrize("kind", [None, "eagle"])
@pytest.mark.parametrize("stop_at", [0, 5, 17])
def test_stops_at_eos_like_hf(tiny_models, kind, stop_at):
    model = tiny_models("llama")
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(6))
    free = hf_greedy(model, ids, 30)
    eos = int(free[0, ids.shape[1] + stop_at])
    ref = hf_greedy(model, ids, 30, eos_token_id=eos)
    drafter = randomized(selfspec.new_drafter(kind, model), seed=7) if kind else None
    out = selfspec.generate(model, ids, drafter=drafter, max_new_tokens=30, eos_token_id=eos)
    assert torch.equal(out.sequences, ref)
    assert int(out.sequences[0, -1]) == eos


@pytest.mark.parametrize("max_new", [1, 2, 7])
def test_max_new_tokens_exact(tiny_models, max_new):
    model = tiny_models("qwen2")
    ids = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(8))
    drafter = OracleDrafter(model, hf_greedy(model, ids, max_new + 8), ids.shape[1], 0)
    out = selfspec.generate(
        model, ids, drafter=drafter, tree=chain(5), max_new_tokens=max_new, eos_token_id=[]
    )
    assert torch.equal(out.sequences, hf_greedy(model, ids, max_new))
    assert out.stats.new_tokens == max_new


def test_stats_are_consistent(tiny_models):
    model = tiny_models("llama")
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(9))
    ref = hf_greedy(model, ids, 50)
    drafter = OracleDrafter(model, ref, ids.shape[1], 0)
    s = selfspec.generate(
        model, ids, drafter=drafter, tree=chain(3), max_new_tokens=50, eos_token_id=[]
    ).stats
    assert sum(s.accepted_hist) == s.steps
    assert s.mean_accepted_length == pytest.approx(
        sum(k * n for k, n in enumerate(s.accepted_hist)) / s.steps
    )
    assert s.steps * s.mean_accepted_length >= s.new_tokens - 1  # first token comes from the prefill
    assert s.tokens_per_s > 0 and s.wall_s >= s.prefill_s > 0
    assert s.accepted_by_depth == sorted(s.accepted_by_depth, reverse=True)


def test_streamer_receives_prompt_then_tokens(tiny_models):
    model = tiny_models("llama")
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(10))

    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    rec = Recorder()
    drafter = randomized(selfspec.new_drafter("medusa", model), seed=11)
    out = selfspec.generate(model, ids, drafter=drafter, max_new_tokens=20, eos_token_id=[], streamer=rec)
    assert rec.chunks[0] == ids[0].tolist() and rec.ended
    assert [t for chunk in rec.chunks[1:] for t in chunk] == out.sequences[0, 5:].tolist()


def test_works_with_transformers_text_streamer(tiny_models, capsys):
    from transformers import TextStreamer

    class CharTokenizer:  # minimal tokenizer: TextStreamer only needs decode()
        def decode(self, ids, **kw):
            return "".join(chr(65 + i % 26) for i in ids)

    model = tiny_models("llama")
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(12))
    out = selfspec.generate(
        model,
        ids,
        max_new_tokens=12,
        eos_token_id=[],
        streamer=TextStreamer(CharTokenizer(), skip_prompt=True),
    )
    printed = capsys.readouterr().out.strip()
    assert printed == CharTokenizer().decode(out.sequences[0, 5:].tolist())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
        ({"max_new_tokens": -3}, "max_new_tokens must be a positive integer"),
        ({"max_new_tokens": 600}, "exceeds the model context"),
        ({"input_ids": torch.zeros(1, 0, dtype=torch.long)}, "non-empty"),
        ({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, "batch size 2"),
        ({"input_ids": torch.zeros(1, 3)}, "integer token ids"),
    ],
)
def test_bad_requests_fail_early(tiny_models, kwargs, message):
    model = tiny_models("llama")
    args = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        selfspec.generate(model, **args)


def test_model_without_attention_interface_is_refused(tiny_models, monkeypatch):
    from selfspec.hf import check_supported

    model = tiny_models("llama")
    monkeypatch.setattr(type(model), "_supports_attention_backend", False)
    with pytest.raises(ValueError, match="AttentionInterface"):
        check_supported(model)


def test_attention_implementation_is_restored(tiny_models):
    model = tiny_models("llama")
    before = model.config._attn_implementation
    selfspec.generate(model, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=3)
    assert model.config._attn_implementation == before


@pytest.mark.parametrize("kind", [None, "eagle", "medusa"])
def test_triton_backend_end_to_end(tiny_models, monkeypatch, kind):
    """SELFSPEC_ATTENTION=triton routes tree attention and the KV commit through the Triton kernels
    (the interpreter on CPU); greedy output still equals HF's."""
    from selfspec.kernels import tree_attention as tree_kernel

    if not tree_kernel.HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("SELFSPEC_ATTENTION", "triton")
    model = tiny_models("llama", torch.float32)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(13))
    ref = hf_greedy(model, ids, 16)
    drafter = randomized(selfspec.new_drafter(kind, model, tree_nodes=6), seed=14, std=0.05) if kind else None
    calls = {"attn": 0}
    real_attn = tree_kernel.tree_attention

    def counting_attn(*a, **k):
        calls["attn"] += 1
        return real_attn(*a, **k)

    monkeypatch.setattr(tree_kernel, "tree_attention", counting_attn)
    out = selfspec.generate(model, ids, drafter=drafter, max_new_tokens=16, eos_token_id=[])
    assert torch.equal(out.sequences, ref)
    if kind is not None:
        assert calls["attn"] > 0  # tree steps went through the kernel


def test_triton_commit_with_oracle_drafter(tiny_models, monkeypatch):
    """Non-contiguous accepted paths through the Triton KV commit kernel."""
    from selfspec.kernels import tree_attention as tree_kernel

    if not tree_kernel.HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("SELFSPEC_ATTENTION", "triton")
    model = tiny_models("qwen2", torch.float32)
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(15))
    ref = hf_greedy(model, ids, 12)
    drafter = OracleDrafter(model, ref, ids.shape[1], rank=1)
    tree = build_tree([(r,) for r in range(2)] + [(r, s) for r in range(2) for s in range(2)])
    commits = []
    real_commit = selfspec.cache.kv_commit
    monkeypatch.setattr("selfspec.cache.kv_commit", lambda *a: commits.append(1) or real_commit(*a))
    out = selfspec.generate(model, ids, drafter=drafter, tree=tree, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(out.sequences, ref)
    assert commits  # rank-1 paths skip nodes, so the gather ran in the Triton kernel
    assert out.stats.mean_accepted_length > 2.5
