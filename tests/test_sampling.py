"""Logits warping: temperature, top-k, top-p, the processor hook, and config validation."""

import math

import pytest
import torch

from selfspec.sampling import SamplingConfig, sample_tokens, warp_logits


def log(probs):
    return torch.tensor(probs).log()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"seed": "7"}, "seed must be an integer or None"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_config_defaults_are_greedy_and_generator_is_seeded():
    assert SamplingConfig().greedy and not SamplingConfig(temperature=0.7).greedy
    assert SamplingConfig().make_generator() is None
    a, b = SamplingConfig(seed=3).make_generator(), SamplingConfig(seed=3).make_generator()
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


@pytest.mark.parametrize(
    "logits, expected",
    [
        ([1.0, 3.0, 2.0], [0.0, 1.0, 0.0]),
        ([5.0, 1.0, 5.0], [1.0, 0.0, 0.0]),  # ties: the first index, as greedy_accept's argmax
    ],
)
def test_greedy_is_a_point_mass_on_the_argmax(logits, expected):
    cfg = SamplingConfig(temperature=0.0, top_k=1, top_p=0.5)  # filters have no effect when greedy
    assert torch.equal(warp_logits(torch.tensor(logits), cfg), torch.tensor(expected))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature_divides_logits(temperature):
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    probs = warp_logits(logits, SamplingConfig(temperature=temperature))
    torch.testing.assert_close(probs, (logits / temperature).softmax(-1))


@pytest.mark.parametrize(
    "probs, top_k, kept",
    [
        ([0.1, 0.4, 0.2, 0.3], 1, [1]),
        ([0.1, 0.4, 0.2, 0.3], 2, [1, 3]),
        ([0.1, 0.4, 0.2, 0.3], 9, [0, 1, 2, 3]),  # k beyond V keeps everything
        ([0.3, 0.1, 0.3, 0.3], 2, [0, 2, 3]),  # ties with the k-th value are all kept
    ],
)
def test_top_k_keeps_the_k_largest(probs, top_k, kept):
    out = warp_logits(log(probs), SamplingConfig(temperature=1.0, top_k=top_k))
    expected = torch.zeros(len(probs))
    expected[kept] = torch.tensor(probs)[kept] / torch.tensor(probs)[kept].sum()
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    "top_p, kept",
    [
        (1.0, [0, 1, 2, 3]),
        (0.4, [0]),  # the most likely token alone already holds 0.5
        (0.75, [0, 1]),
        (0.85, [0, 1, 2]),
        (0.99, [0, 1, 2, 3]),
        (1e-6, [0]),  # never empty
    ],
)
def test_top_p_keeps_the_smallest_nucleus(top_p, kept):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    perm = torch.tensor([2, 0, 3, 1])  # not sorted in vocab order
    out = warp_logits(probs[perm].log(), SamplingConfig(temperature=1.0, top_p=top_p))
    expected = torch.zeros(4)
    expected[kept] = probs[kept] / probs[kept].sum()
    torch.testing.assert_close(out, expected[perm])


def test_top_p_applies_after_temperature():
    # At temperature 1, 0.5 + 0.3 < 0.85 keeps three tokens; sharpened by T=0.5 the top two
    # hold 0.25/0.35 + 0.09/0.35 = 0.97, so only two survive.
    logits = log([0.5, 0.3, 0.15, 0.05])
    assert (warp_logits(logits, SamplingConfig(temperature=1.0, top_p=0.85)) > 0).sum() == 3
    assert (warp_logits(logits, SamplingConfig(temperature=0.5, top_p=0.85)) > 0).sum() == 2


def test_top_k_applies_before_top_p():
    # top_k=3 renormalizes 0.4/0.3/0.2 to 0.44/0.33/0.22, so top_p=0.7 needs two of them.
    out = warp_logits(log([0.4, 0.3, 0.2, 0.1]), SamplingConfig(temperature=1.0, top_k=3, top_p=0.7))
    torch.testing.assert_close(out, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]))


def test_processor_runs_first_on_flat_rows_and_sees_input_ids():
    seen = {}

    def ban_token_1(input_ids, scores):
        seen["ids"], seen["shape"] = input_ids, tuple(scores.shape)
        return scores.index_fill(1, torch.tensor([1]), -math.inf)

    logits = torch.tensor([[[0.0, 9.0, 1.0], [2.0, 8.0, 0.0]]])  # [1, 2, 3]
    ids = torch.tensor([[4, 5], [4, 6]])
    greedy = warp_logits(logits, SamplingConfig(), ban_token_1, ids)
    assert seen["shape"] == (2, 3) and seen["ids"] is ids
    assert torch.equal(greedy, torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]]))
    sampled = warp_logits(logits, SamplingConfig(temperature=1.0), ban_token_1, ids)
    assert sampled.shape == (1, 2, 3) and bool((sampled[..., 1] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_is_fp32_probabilities_over_leading_dims(dtype):
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0)).to(dtype)
    probs = warp_logits(logits, SamplingConfig(temperature=0.8, top_k=5, top_p=0.9))
    assert probs.dtype == torch.float32 and probs.shape == (2, 3, 11)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3))
    assert bool(((probs > 0).sum(-1) <= 5).all())


def test_sample_tokens_draws_from_each_row():
    probs = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    assert torch.equal(sample_tokens(probs), torch.tensor([[1, 2]]))
