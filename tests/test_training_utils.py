"""Shared helpers for the training tests (a tiny target with a byte-level tokenizer and chat
template), and tests of the small training utilities."""

import pytest

from selfspec.io import atomic_write_text
from tests.helpers import tiny_target_dir, tiny_tokenizer


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
