"""Helpers the test modules share (tiny models and tokenizers, the HF reference, oracles, data
files): test modules import from here, never from each other or from conftest."""

import json
from pathlib import Path

import torch
import transformers
from scipy.stats import chisquare
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

from selfspec.drafters import Draft, Drafter, DrafterConfig, SharedModules
from selfspec.models import TINY_SIZES
from selfspec.tree import chain

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
    config = config_cls(**{**TINY_SIZES, "vocab_size": vocab, **extra})
    model = model_cls(config)
    for layer in getattr(getattr(model, "model", None), "layers", ()):
        if hasattr(layer.self_attn, "sinks"):  # initialized near 0; make them take a real share of the mass
            torch.nn.init.normal_(layer.self_attn.sinks, std=2.0)
    return model.to(dtype).eval()


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


def randomized(drafter, seed=0, std=0.3):
    """An untrained drafter with random weights, so it proposes varied (mostly wrong) tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return drafter


class OracleDrafter(Drafter):
    """Knows the reference continuation and puts the right token at ``rank`` on every depth, the
    other ranks filled with wrong tokens. With rank > 0 the accepted path skips nodes, which
    exercises the KV commit gather; any mistake in positions, masks or commit breaks equality."""

    kind = "oracle"

    def __init__(self, model, reference, prompt_len, rank):
        config = DrafterConfig(hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size)
        super().__init__(config, SharedModules(model.get_input_embeddings(), model.get_output_embeddings()))
        self.reference, self.prompt_len, self.rank = reference.flatten().tolist(), prompt_len, rank

    def default_paths(self):
        return chain(3).paths()

    def begin(self, max_len):
        return {"root": None}  # reference index of the current root (bonus) token

    def propose(self, state, hidden, next_tokens, tree, sampler=None):
        first = state["root"] is None
        state["root"] = self.prompt_len if first else state["root"] + len(next_tokens)
        tokens = torch.empty(tree.size, dtype=torch.long)
        tokens[0] = next_tokens[-1]
        for i in range(1, tree.size):
            at = state["root"] + int(tree.depths[i])
            right = self.reference[at] if at < len(self.reference) else 0
            tokens[i] = right if int(tree.ranks[i]) == self.rank else (right + 1 + int(tree.ranks[i])) % 256
        return Draft(tree=tree, tokens=tokens)


def exact_two_token_probs(model, ids, temperature, top_p=1.0):
    """The target's own distribution over the next two tokens [V, V] (warped by temperature and,
    below 1, nucleus filtering at ``top_p``)."""

    def warp(logits):
        probs = (logits.double() / temperature).softmax(-1)
        if top_p < 1:  # keep the most likely tokens until the mass before a token reaches top_p
            order = probs.sort(dim=-1, descending=True, stable=True)
            before = order.values.cumsum(-1) - order.values
            keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order.indices, before < top_p)
            probs = torch.where(keep, probs, 0.0)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    with torch.no_grad():
        p1 = warp(model(ids).logits[0, -1])  # [V]
        v = p1.numel()
        seconds = torch.cat([ids.expand(v, -1), torch.arange(v)[:, None]], 1)
        p2 = warp(model(seconds).logits[:, -1])  # [V, V]
    return p1[:, None] * p2


def chi2_pvalue(counts, probs, min_expected=5.0):
    """Chi-square goodness of fit, cells with small expected counts merged into one. Cells the
    distribution rules out must be empty (p-value 0 otherwise) and are left out."""
    impossible = probs.flatten() == 0
    if float(counts.flatten()[impossible].sum()) > 0:
        return 0.0
    counts, probs = counts.flatten()[~impossible], probs.flatten()[~impossible]
    expected = probs.flatten() * counts.sum()
    big = expected >= min_expected
    obs, exp = counts.flatten()[big], expected[big]
    if bool((~big).any()):
        obs = torch.cat([obs, counts.flatten()[~big].sum()[None]])
        exp = torch.cat([exp, expected[~big].sum()[None]])
    return chisquare(obs.numpy(), exp.numpy()).pvalue


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>"]


PROMPTS = [
    "add two numbers",
    "say hello",
    "count to five",
    "name a color",
    "write a poem",
    "spell cat",
    "list three fruits",
    "what is rain",
    "why is the sky blue",
    "tell a joke",
    "sum 2 and 3",
    "greet me",
]


def tiny_tokenizer():
    """Byte-level tokenizer: ids 0-255 are bytes, 256/257 the chat markers (eos = <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template=CHAT_TEMPLATE
    )


def tiny_target_dir(path: Path, seed: int = 0) -> Path:
    """A saved tiny Llama (vocab 260) + tokenizer that ``selfspec.load_target`` loads."""
    model = make_tiny("llama", dtype=torch.float32, seed=seed, vocab=260)
    model.generation_config.eos_token_id = 257
    model.generation_config.pad_token_id = 257
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompt_rows(n: int = 12) -> list[dict]:
    return [
        {"instruction": PROMPTS[i % len(PROMPTS)] + f" #{i}", "input": "", "output": "ok"} for i in range(n)
    ]


def propose_once(model, drafter, prompt):
    from selfspec.hf import StoreCache, new_store, selfspec_attention, target_forward

    with torch.inference_mode(), selfspec_attention(model):
        cache = StoreCache(new_store(model, 64))
        out = target_forward(model, cache, prompt, feature_layers=drafter.feature_layers)
        bonus = out.logits[-1].argmax()[None]
        state = drafter.begin(64)
        return drafter.propose(state, out.hidden, torch.cat([prompt[1:], bonus]), drafter.tree)


def loopback_works() -> bool:
    """Whether this machine can talk to itself over TCP (torchrun's rendezvous needs it)."""
    import socket

    try:
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            with socket.create_connection(server.getsockname(), timeout=2):
                return True
    except OSError:
        return False
