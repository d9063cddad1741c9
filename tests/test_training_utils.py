"""Shared helpers for the training tests (a tiny target with a byte-level tokenizer and chat
template), and tests of the small training utilities."""

import json
from pathlib import Path

import pytest
import torch

from selfspec.training.utils import atomic_write_text
from tests.conftest import make_tiny

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>"]


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


def prompt_rows(n: int = 12) -> list[dict]:
    return [
        {"instruction": PROMPTS[i % len(PROMPTS)] + f" #{i}", "input": "", "output": "ok"} for i in range(n)
    ]


def test_tiny_tokenizer_round_trip():
    tok = tiny_tokenizer()
    ids = tok.apply_chat_template([{"role": "user", "content": "héllo"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == 256 and max(ids) < 260
    assert tok.decode(tok("héllo")["input_ids"]) == "héllo"


def test_atomic_write_text_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


@pytest.fixture
def tiny_target(tmp_path_factory):
    return tiny_target_dir(tmp_path_factory.mktemp("target"))
