"""Engine-level tests of dynamic trees, lossless sampling and tree="auto"."""

import pytest
import torch

import selfspec
from selfspec.tree import DynamicTree, TreeBuffers
from tests.helpers import chi2_pvalue, exact_two_token_probs, hf_greedy, make_tiny, randomized


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("kind", ["medusa", "eagle", "eagle3", "block"])
@pytest.mark.parametrize("spec", [DynamicTree(depth=3, top_k=3, expand=2, budget=6), DynamicTree(budget=20)])
def test_greedy_with_dynamic_trees_matches_hf(tiny_models, arch, kind, spec):
    model = tiny_models(arch)
    drafter = randomized(
        selfspec.new_drafter(kind, model, **({"num_heads": 6} if kind == "medusa" else {})), seed=21
    )
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(22))
    out = selfspec.generate(model, ids, drafter=drafter, tree=spec, max_new_tokens=32, eos_token_id=[])
    assert torch.equal(out.sequences, hf_greedy(model, ids, 32))
    assert out.stats.tree_nodes == spec.budget


def test_tree_arguments(tiny_models):
    model = tiny_models("llama")
    drafter = selfspec.new_drafter("eagle", model)
    ids = torch.tensor([[1, 2, 3]])
    for tree in ("static", "dynamic", 5, None):
        assert (
            selfspec.generate(model, ids, drafter=drafter, tree=tree, max_new_tokens=4).stats.new_tokens == 4
        )
    with pytest.raises(ValueError, match="tree='bushy' is not understood"):
        selfspec.generate(model, ids, drafter=drafter, tree="bushy", max_new_tokens=4)
    with pytest.raises(ValueError, match="tree size must be >= 1"):
        selfspec.generate(model, ids, drafter=drafter, tree=0, max_new_tokens=4)


@pytest.mark.parametrize("kind", [None, "eagle"])
def test_seeded_sampling_is_reproducible(tiny_models, kind):
    model = tiny_models("llama")
    drafter = randomized(selfspec.new_drafter(kind, model), seed=23) if kind else None
    ids = torch.tensor([[5, 6, 7, 8]])
    run = lambda seed: (
        selfspec.generate(
            model,
            ids,
            drafter=drafter,
            max_new_tokens=24,
            temperature=1.0,
            top_p=0.95,
            seed=seed,
            eos_token_id=[],
        ).sequences
    )
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_sampled_output_follows_target_distribution():
    """End to end through drafting, tree verification, rejection sampling and the KV commit: the
    joint of the first two sampled tokens matches the target's own distribution (chi-square,
    significance 0.001), while a target-agnostic draft-only sampler is rejected (power check)."""
    model = make_tiny("llama", vocab=8, seed=31)
    drafter = randomized(selfspec.new_drafter("eagle", model), seed=32, std=0.5)
    ids = torch.tensor([[1, 3, 5]])
    exact = exact_two_token_probs(model, ids, temperature=1.0)
    draws = 1500
    counts = torch.zeros(8, 8, dtype=torch.float64)
    drafted = torch.zeros(8, 8, dtype=torch.float64)
    for seed in range(draws):
        out = selfspec.generate(
            model,
            ids,
            drafter=drafter,
            tree=DynamicTree(depth=2, top_k=3, expand=2, budget=6),
            max_new_tokens=2,
            temperature=1.0,
            seed=seed,
            eos_token_id=[],
        )
        a, b = out.sequences[0, 3:].tolist()
        counts[a, b] += 1
    assert chi2_pvalue(counts, exact) > 1e-3
    # power: the drafter's own top-1 chain is a different distribution and must be rejected
    with torch.no_grad():
        from selfspec.hf import target_features

        for seed in range(draws):
            g = torch.Generator().manual_seed(seed)
            a = torch.multinomial(exact.sum(1), 1, generator=g).item()
            feats = target_features(model, torch.cat([ids, torch.tensor([[a]])], 1))
            b = int(
                model.lm_head(
                    drafter(feats.hidden[0, :-1], torch.cat([ids[0, 1:], torch.tensor([a])]))[-1]
                ).argmax()
            )
            drafted[a, b] += 1
    assert chi2_pvalue(drafted, exact) < 1e-3


def test_typical_acceptance_runs_and_is_greedy_at_zero_temperature(tiny_models):
    model = tiny_models("llama")
    drafter = randomized(selfspec.new_drafter("medusa", model), seed=33)
    ids = torch.tensor([[9, 8, 7]])
    out = selfspec.generate(
        model, ids, drafter=drafter, acceptance="typical", max_new_tokens=20, eos_token_id=[]
    )
    assert torch.equal(out.sequences, hf_greedy(model, ids, 20))
    sampled = selfspec.generate(
        model,
        ids,
        drafter=drafter,
        acceptance="typical",
        temperature=0.8,
        seed=1,
        max_new_tokens=20,
        eos_token_id=[],
    )
    assert sampled.stats.new_tokens == 20
    with pytest.raises(ValueError, match="acceptance must be one of"):
        selfspec.generate(model, ids, acceptance="lenient", max_new_tokens=2)


def test_logits_processor_applies_to_every_node(tiny_models):
    """A processor that bans a token: no sampled output contains it, whatever the drafter proposes."""
    model = tiny_models("llama")
    ref = hf_greedy(model, torch.tensor([[4, 4, 4]]), 16)[0, 3:]
    banned = int(ref[0])

    def ban(input_ids, scores):
        scores = scores.clone()
        scores[:, banned] = -float("inf")
        return scores

    drafter = randomized(selfspec.new_drafter("eagle", model), seed=34)
    for seed in range(3):
        out = selfspec.generate(
            model,
            torch.tensor([[4, 4, 4]]),
            drafter=drafter,
            max_new_tokens=16,
            temperature=0.7,
            seed=seed,
            logits_processor=ban,
            eos_token_id=[],
        )
        assert banned not in out.sequences[0, 3:].tolist()


def test_bad_sampling_values(tiny_models):
    model = tiny_models("llama")
    for kwargs, message in [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
    ]:
        with pytest.raises(ValueError, match=message):
            selfspec.generate(model, torch.tensor([[1]]), max_new_tokens=2, **kwargs)


def test_auto_tree_measures_once_and_caches(tiny_models, tmp_path, monkeypatch):
    from selfspec import autotune

    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))
    model = tiny_models("llama")
    drafter = selfspec.new_drafter("eagle", model)
    spec = autotune.auto_tree(model, drafter, budgets=(2, 6))
    assert spec.budget in (2, 6)
    assert (tmp_path / "autotune.json").is_file()
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: pytest.fail("measured twice"))
    assert autotune.auto_tree(model, drafter, budgets=(2, 6)) == spec
    out = selfspec.generate(model, torch.tensor([[1, 2]]), drafter=drafter, tree="auto", max_new_tokens=8)
    assert out.stats.new_tokens == 8


def test_auto_tree_picks_plain_decoding_when_drafting_does_not_pay(tiny_models, tmp_path, monkeypatch):
    from selfspec import autotune

    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))
    model = tiny_models("llama")
    drafter = selfspec.new_drafter("eagle", model)
    # prior acceptance 0.6 at depth 1: a 2-node tree keeps 1.6 tokens a step; costing 2x a plain
    # step (draft + verify), it makes 0.8 tokens per plain step's time, so plain decoding wins
    monkeypatch.setattr(autotune, "measure", lambda m, d, budgets, **k: {1: (0.0, 1.0), 2: (1.0, 1.0)})
    spec = autotune.auto_tree(model, drafter, budgets=(1, 2))
    assert isinstance(spec, TreeBuffers) and spec.size == 1
    monkeypatch.setattr(drafter, "propose", lambda *a, **k: pytest.fail("drafted with a root-only tree"))
    ids = torch.tensor([[1, 2, 3]])
    out = selfspec.generate(model, ids, drafter=drafter, tree="auto", max_new_tokens=6, eos_token_id=[])
    assert out.stats.tree_nodes == 1 and out.stats.steps == 5
    assert out.sequences.tolist() == hf_greedy(model, ids, 6).tolist()


def test_auto_tree_picks_a_tree_when_it_pays(tiny_models, tmp_path, monkeypatch):
    from selfspec import autotune

    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))
    model = tiny_models("llama")
    drafter = selfspec.new_drafter("eagle", model)
    monkeypatch.setattr(
        autotune,
        "measure",
        lambda m, d, budgets, **k: {n: (0.1, 1.0) if n > 1 else (0.0, 1.0) for n in budgets},
    )
    spec = autotune.auto_tree(model, drafter, budgets=(1, 4, 8))
    assert spec == DynamicTree.sized(8)  # same cost, more nodes, more tokens: the biggest wins


@pytest.mark.parametrize("verify", ["exact", "batched"])
def test_auto_times_every_budget_in_the_requested_verification(tiny_models, monkeypatch, verify):
    from selfspec import autotune

    seen = []
    real = autotune.TreeMask
    monkeypatch.setattr(
        autotune, "TreeMask", lambda anc, backend, exact: seen.append(exact) or real(anc, backend, exact)
    )
    model = tiny_models("llama")
    autotune.measure(
        model, selfspec.new_drafter("eagle", model), budgets=(1, 2, 3, 6), repeats=1, verify=verify
    )
    assert seen == [verify == "exact"] * 3  # one mask per drafting budget, each in the mode asked for


def test_auto_reads_the_calibrated_acceptance(tiny_models):
    from selfspec.autotune import drafter_acceptance

    model = tiny_models("llama")
    drafter = selfspec.new_drafter("eagle", model, acceptance=[[0.5, 0.2], [0.3, 0.1]])
    assert drafter_acceptance(drafter, DynamicTree()).tolist() == [[0.5, 0.2], [0.3, 0.1]]
    with pytest.raises(ValueError, match="acceptance must be"):
        selfspec.new_drafter("eagle", model, acceptance=[[1.5]])


def test_sized_dynamic_tree_drafts_no_more_than_it_keeps():
    assert DynamicTree.sized(4) == DynamicTree(depth=3, top_k=3, expand=3, budget=4)
    assert DynamicTree.sized(64) == DynamicTree(budget=64)
    assert DynamicTree.sized(2).pool_size == 2
    with pytest.raises(ValueError, match="budget must be >= 1"):
        DynamicTree.sized(0)


def test_expected_tau_grows_with_budget():
    from selfspec.autotune import budget_tau
    from selfspec.tree import prior_acceptance

    acc = prior_acceptance(4, 4, 0.7, 0.8)
    taus = [budget_tau(acc, n) for n in (1, 2, 8, 32)]
    assert taus[0] == 1.0 and taus == sorted(taus) and taus[1] == pytest.approx(1.7)


def test_auto_tree_cache_key_changes_with_the_cpu_kernel_switches(tiny_models, monkeypatch):
    """A table timed with the CPU attention kernel on is not reused with it off."""
    from selfspec import autotune

    model = tiny_models("llama")
    drafter = selfspec.new_drafter("eagle", model)
    monkeypatch.delenv("SELFSPEC_CPU_ATTENTION", raising=False)
    monkeypatch.delenv("SELFSPEC_CPU_KERNELS", raising=False)
    default = autotune.cache_key(model, drafter)
    monkeypatch.setenv("SELFSPEC_CPU_ATTENTION", "1")
    assert autotune.cache_key(model, drafter) == default  # on by default: the same table
    monkeypatch.setenv("SELFSPEC_CPU_ATTENTION", "0")
    off = autotune.cache_key(model, drafter)
    monkeypatch.setenv("SELFSPEC_CPU_KERNELS", "0")
    assert len({default, off, autotune.cache_key(model, drafter)}) == 3


# ----------------------------------------------------------------------- sampled candidates


def _two_token_counts(model, ids, draws, **kwargs):
    counts = torch.zeros(model.config.vocab_size, model.config.vocab_size, dtype=torch.float64)
    for seed in range(draws):
        out = selfspec.generate(model, ids, max_new_tokens=2, seed=seed, eos_token_id=[], **kwargs)
        a, b = out.sequences[0, ids.shape[1] :].tolist()
        counts[a, b] += 1
    return counts


SAMPLED_CASES = {
    # kind, tree, extra generate() arguments
    "eagle-static": ("eagle", "static", {}),
    "eagle-dynamic": ("eagle", DynamicTree(depth=2, top_k=3, expand=2, budget=6), {}),
    "eagle3-dynamic-top-p": ("eagle3", DynamicTree(depth=2, top_k=3, expand=2, budget=6), {"top_p": 0.7}),
    "medusa-static-top-p": ("medusa", "static", {"top_p": 0.7}),  # small supports: fillers
    "medusa-dynamic": ("medusa", DynamicTree(depth=2, top_k=3, expand=2, budget=6), {}),
    "block-static-top-p": ("block", "static", {"top_p": 0.7}),
    "eagle-dynamic-lookup": ("eagle", DynamicTree(depth=2, top_k=3, expand=2, budget=6), {"lookup": True}),
    "eagle3-static-draft-vocab": ("eagle3", "static", {}),  # 5 of the 8 tokens: rows spread back
    "medusa-dynamic-draft-vocab": ("medusa", DynamicTree(depth=2, top_k=3, expand=2, budget=6), {}),
}


@pytest.mark.parametrize("case", list(SAMPLED_CASES))
def test_sampled_candidates_follow_the_target_distribution(case):
    """Candidates drawn from the drafter (static trees, dynamic trees grown by level quotas, Medusa
    heads, nucleus-filtered supports with fillers, lookup branches merged in): the joint of the
    first two tokens still matches the target's own distribution (chi-square, significance 0.001)."""
    kind, tree, extra = SAMPLED_CASES[case]
    model = make_tiny("llama", vocab=8, seed=31)
    reduced = case.endswith("draft-vocab")
    drafter = selfspec.new_drafter(kind, model, tree_nodes=5, draft_vocab_size=5 if reduced else 0)
    if reduced:
        drafter.set_draft_vocab(torch.tensor([6, 0, 2, 3, 5]))
    drafter = randomized(drafter, seed=32, std=0.5)
    ids = torch.tensor([[1, 3, 5, 1, 3]])  # "1 3" repeats: the lookup has a match to propose
    exact = exact_two_token_probs(model, ids, temperature=1.0, top_p=extra.get("top_p", 1.0))
    counts = _two_token_counts(
        model, ids, 1500, drafter=drafter, tree=tree, temperature=1.0, candidates="sampled", **extra
    )
    assert chi2_pvalue(counts, exact) > 1e-3


@pytest.mark.parametrize("tree", ["static", DynamicTree(depth=2, top_k=3, expand=2, budget=6)], ids=str)
def test_siblings_ordered_by_their_value_are_detected(monkeypatch, tree):
    """Power: siblings drawn without replacement but then put in order of their probability (so
    the first is the best of several draws, not a draw from q) bias the output, and the test above
    sees it. (Trying sampled tokens as point masses would not: that is lossless, only slower.)"""
    import selfspec.tree as tree_module

    real = tree_module.sample_without_replacement

    def best_first(probs, k, generator=None, fallback=None):
        tokens, sampled = real(probs, k, generator, fallback)
        order = probs.gather(1, tokens).argsort(dim=1, descending=True, stable=True)
        return tokens.gather(1, order), sampled.gather(1, order)

    monkeypatch.setattr(tree_module, "sample_without_replacement", best_first)
    model = make_tiny("llama", vocab=8, seed=31)
    drafter = randomized(selfspec.new_drafter("eagle", model, tree_nodes=5), seed=32, std=0.5)
    ids = torch.tensor([[1, 3, 5, 1, 3]])
    exact = exact_two_token_probs(model, ids, temperature=1.0)
    counts = _two_token_counts(
        model, ids, 1500, drafter=drafter, tree=tree, temperature=1.0, candidates="sampled"
    )
    assert chi2_pvalue(counts, exact) < 1e-3


def test_candidates_argument(tiny_models):
    from selfspec.decoding import resolve_candidates
    from selfspec.sampling import SamplingConfig

    warm, greedy = SamplingConfig(temperature=1.0), SamplingConfig()
    assert resolve_candidates("sampled", greedy) == "top-k"  # a draw from a point mass is its argmax
    assert resolve_candidates("top-k", warm) == "top-k"
    assert resolve_candidates("sampled", warm) == "sampled"
    assert resolve_candidates("auto", warm, "typical") == "top-k"
    assert resolve_candidates("auto", warm) == "sampled"  # measured: sampled wins at 1.0
    assert resolve_candidates("auto", SamplingConfig(temperature=0.3)) == "top-k"
    with pytest.raises(ValueError, match="needs acceptance='exact'"):
        resolve_candidates("sampled", warm, "typical")
    model, ids = tiny_models("llama"), torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="candidates must be one of"):
        selfspec.generate(model, ids, temperature=1.0, candidates="random")
