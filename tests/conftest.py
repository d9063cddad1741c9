"""Shared test set-up.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, at
collection time, whenever no CUDA device is present: the kernels then run (slowly) on the CPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TINY = {
    # name: (model class, config class, extra config); GQA in all but "llama-mha".
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    "llama-mha": (LlamaForCausalLM, LlamaConfig, {"num_key_value_heads": 4}),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {}),
    "mistral": (MistralForCausalLM, MistralConfig, {"sliding_window": None}),
}


def make_tiny(arch: str = "llama", dtype: torch.dtype = torch.float64, seed: int = 0, vocab: int = 256):
    """A random-weight tiny causal LM. fp64 by default so that greedy near-ties cannot flip the
    comparison with HF generate through float reordering; the engine runs in the model's dtype."""
    model_cls, config_cls, extra = TINY[arch]
    torch.manual_seed(seed)
    sizes = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config = config_cls(**{**sizes, **extra})
    return model_cls(config).to(dtype).eval()


@pytest.fixture(scope="session")
def tiny_models():
    cache: dict = {}

    def get(arch: str = "llama", dtype: torch.dtype = torch.float64):
        if (arch, dtype) not in cache:
            cache[arch, dtype] = make_tiny(arch, dtype)
        return cache[arch, dtype]

    return get


def hf_greedy(model, ids, max_new_tokens, eos_token_id=None):
    """The reference: transformers' own greedy decoding."""
    return model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=0,
        attention_mask=torch.ones_like(ids),
    )


def make_tokenizer(vocab: int = 256):
    """A small byte-level BPE tokenizer built offline, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return fast


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A saved tiny Llama (fp32) + tokenizer directory, loadable with selfspec.load_target."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tokenizer()
    model = make_tiny("llama", dtype=torch.float32, vocab=len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
