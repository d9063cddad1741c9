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
import transformers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GptOssConfig,
    GptOssForCausalLM,
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
    # Attention options the engine must reproduce inside a tree; windows of 5 tokens so that they
    # cut the prefix within a short test.
    "mistral-window": (MistralForCausalLM, MistralConfig, {"sliding_window": 5}),
    "qwen2-window": (
        Qwen2ForCausalLM,
        Qwen2Config,
        {"sliding_window": 5, "use_sliding_window": True, "max_window_layers": 1},
    ),  # layer 1 slides
    "gemma3": (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        {"head_dim": 16, "sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"]},
    ),
    # Scores of random weights are tiny: unit query scaling and a cap of 0.1 make the cap bind.
    "gemma2": (
        Gemma2ForCausalLM,
        Gemma2Config,
        {"head_dim": 16, "sliding_window": 5, "query_pre_attn_scalar": 1, "attn_logit_softcapping": 0.1},
    ),
    # + attention sinks (see make_tiny); fp32 only: its expert matmuls take no fp64.
    "gpt-oss": (
        GptOssForCausalLM,
        GptOssConfig,
        {
            "head_dim": 16,
            "sliding_window": 5,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
}
# Further families, checked end to end in tests/test_architectures.py (model class, config class, extra).
FAMILIES = {
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 16}),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {"head_dim": 16}),
    "phi": ("PhiForCausalLM", "PhiConfig", {}),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {"pad_token_id": 0}),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", {}),
    "granite": ("GraniteForCausalLM", "GraniteConfig", {}),
    "smollm3": ("SmolLM3ForCausalLM", "SmolLM3Config", {"pad_token_id": 0}),
    "qwen2-moe": (
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
        },
    ),
    # Multi-head attention only: their configs have no KV-head count.
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", {"n_layer": 2, "n_head": 4, "num_key_value_heads": 4}),
    "gpt-neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", {"num_key_value_heads": 4}),
    "opt": (
        "OPTForCausalLM",
        "OPTConfig",
        {"ffn_dim": 128, "word_embed_proj_dim": 64, "num_key_value_heads": 4},
    ),
}
TINY.update(
    {
        name: (getattr(transformers, m), getattr(transformers, c), extra)
        for name, (m, c, extra) in FAMILIES.items()
    }
)
# A down projection with a long reduction (K = 1536, as the default model's): on CPUs whose bf16
# GEMM blocks K differently for one row than for several, its rows are not row-invariant.
TINY["llama-wide-mlp"] = (LlamaForCausalLM, LlamaConfig, {"intermediate_size": 1536})
# Attention written inline, not through AttentionInterface: must be refused (tests/test_architectures.py).
TINY["stablelm"] = (transformers.StableLmForCausalLM, transformers.StableLmConfig, {})


def make_tiny(arch: str = "llama", dtype: torch.dtype = torch.float64, seed: int = 0, vocab: int = 256):
    """A random-weight tiny causal LM. fp64 by default so that greedy near-ties cannot flip the
    comparison with HF generate through float reordering; the engine runs in the model's dtype."""
    model_cls, config_cls, extra = TINY[arch]
    torch.manual_seed(seed)
    sizes = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    config = config_cls(**{**sizes, **extra})
    model = model_cls(config)
    for layer in getattr(getattr(model, "model", None), "layers", ()):
        if hasattr(layer.self_attn, "sinks"):  # initialized near 0; make them take a real share of the mass
            torch.nn.init.normal_(layer.self_attn.sinks, std=2.0)
    return model.to(dtype).eval()


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
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
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


def node_mismatches(model, prompt, tree, tokens, exact=True):
    """Tree nodes whose verify logits or hidden state differ, in any bit, from one-token decoding
    along the node's own path (root first) after the same prompt: the branch oracle of exactness."""
    from selfspec.hf import StoreCache, TreeMask, new_store, selfspec_attention, target_forward

    def prefilled():
        cache = StoreCache(new_store(model, prompt.numel() + tree.size + 1))
        target_forward(model, cache, prompt)
        cache.store.commit(torch.arange(prompt.numel()))
        return cache

    bad = []
    with torch.inference_mode(), selfspec_attention(model):
        verify = target_forward(
            model, prefilled(), tokens, tree.depths, TreeMask(tree.ancestor_mask, "torch", exact)
        )
        for i in range(tree.size):
            cache = prefilled()
            for j in tree.ancestor_mask[i].nonzero().flatten().tolist():
                step = target_forward(model, cache, tokens[j : j + 1])
                cache.store.commit(torch.arange(1))
            if not (
                torch.equal(step.logits[0], verify.logits[i])
                and torch.equal(step.hidden[0], verify.hidden[i])
            ):
                bad.append(i)
    return bad
