"""--self-prompts: the target writes its own training prompts after its chat template's user-turn
header; kept by the rules (ended the turn, >= 3 words, no repeats), cached and resumable, seeded."""

import json
import zlib

import pytest
import torch

import selfspec
from selfspec.cli import main
from selfspec.training import self_prompts as sp
from tests.helpers import prompt_rows, tiny_target_dir, tiny_tokenizer, write_jsonl

torch.set_num_threads(1)
EOS = 257
# What the fake "target" writes for attempt i (None: it never ends the turn).
SCRIPT = [
    "how do plants grow",
    "what is the tallest mountain",
    "hi",
    "  How do   PLANTS grow ",
    None,
    "write a short poem about rain",
    "name three rivers in europe",
    "why is the sea salty",
    "ok then",
]


def fake_generate(tok, seed, calls):
    """Stands in for generate_batch: recovers the batch's first attempt index from its generator's
    seed (seed ^ crc32("self:<i>")) and answers from SCRIPT."""
    first_of = {seed ^ zlib.crc32(f"self:{i}".encode()): i for i in range(64)}

    def generate(model, prompts, max_new_tokens, sampling, eos, pad, generator):
        assert sampling.temperature == sp.TEMPERATURE and len(set(map(tuple, prompts))) == 1
        first = first_of[generator.initial_seed()]
        calls.append(range(first, first + len(prompts)))
        out = []
        for i in range(first, first + len(prompts)):
            text = SCRIPT[i % len(SCRIPT)]
            ids = tok("no end " * 5 if text is None else text, add_special_tokens=False)["input_ids"]
            out.append(ids if text is None else ids + [EOS])
        return out

    return generate


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return selfspec.load_target(str(tiny_target_dir(tmp_path_factory.mktemp("target"))), device="cpu")


def test_header_is_what_the_template_renders_before_the_user_text():
    tok = tiny_tokenizer()
    header = tok.decode(sp.user_turn_header(tok))
    rendered = tok.apply_chat_template([{"role": "user", "content": "how are you"}], tokenize=False)
    assert header and rendered.startswith(header + "how are you")


def test_a_tokenizer_without_chat_template_is_refused():
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        sp.user_turn_header(tok)


def test_kept_prompts_and_reasons(target, tmp_path, monkeypatch):
    model, tok = target
    calls = []
    monkeypatch.setattr(sp, "generate_batch", fake_generate(tok, 5, calls))
    examples, report = sp.write_prompts(model, tok, 8, tmp_path, batch_size=3, seed=5)
    assert [c.start for c in calls] == [0, 3, 6]  # whole windows of 3, the last one too:
    assert (
        len((tmp_path / "prompts.rank0.jsonl").read_text().splitlines()) == 9
    )  # attempt 8 is kept for later
    assert [e.id for e in examples] == ["self:0", "self:1", "self:5", "self:6", "self:7"]
    assert examples[0].messages == (("user", "how do plants grow"),)
    assert report.rows == 8 and report.used == 5
    assert dict(report.skipped) == {"under 3 words": 1, "repeated": 1, "did not end the turn": 1}


def test_cached_resumed_and_extended(target, tmp_path, monkeypatch):
    model, tok = target
    calls = []
    monkeypatch.setattr(sp, "generate_batch", fake_generate(tok, 0, calls))
    straight, _ = sp.write_prompts(model, tok, 9, tmp_path / "a", batch_size=3)
    sp.write_prompts(model, tok, 3, tmp_path / "b", batch_size=3)  # a run killed after its first batch...
    with open(tmp_path / "b" / "prompts.rank0.jsonl", "a") as f:
        f.write('{"id": "self:3", "te')  # ...while writing the second
    calls.clear()
    resumed, _ = sp.write_prompts(model, tok, 9, tmp_path / "b", batch_size=3)
    assert [c.start for c in calls] == [3, 6] and resumed == straight
    assert all(json.loads(line) for line in (tmp_path / "b" / "prompts.rank0.jsonl").read_text().splitlines())
    monkeypatch.setattr(
        sp, "generate_batch", lambda *a, **k: pytest.fail("cached prompts were generated again")
    )
    assert sp.write_prompts(model, tok, 9, tmp_path / "b", batch_size=3)[0] == straight
    with pytest.raises(ValueError, match="batch_size=3, not 4"):
        sp.write_prompts(model, tok, 9, tmp_path / "b", batch_size=4)


def test_nothing_usable_is_an_error(target, tmp_path, monkeypatch):
    model, tok = target
    monkeypatch.setattr(
        sp, "generate_batch", lambda m, prompts, *a: [[104, 105] for _ in prompts]
    )  # "hi", no end
    with pytest.raises(ValueError, match="no usable prompt.*did not end the turn"):
        sp.write_prompts(model, tok, 4, tmp_path, batch_size=2)


@pytest.fixture(scope="module")
def chatty_target_dir(tmp_path_factory):
    """A tiny target whose turn ends at any of 40 ids, so that random weights finish their prompts."""
    path = tiny_target_dir(tmp_path_factory.mktemp("chatty"))
    config = json.loads((path / "generation_config.json").read_text())
    config["eos_token_id"] = [EOS, *range(200, 239)]
    (path / "generation_config.json").write_text(json.dumps(config))
    return path


def test_real_sampling_is_seeded(chatty_target_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sp, "MIN_WORDS", 1)
    model, tok = selfspec.load_target(str(chatty_target_dir), device="cpu")
    a, report = sp.write_prompts(model, tok, 6, tmp_path / "a", batch_size=3, seed=1)
    b, _ = sp.write_prompts(model, tok, 6, tmp_path / "b", batch_size=3, seed=1)
    c, _ = sp.write_prompts(model, tok, 6, tmp_path / "c", batch_size=3, seed=2)
    assert report.used >= 1 and a == b and a != c


def test_train_with_self_prompts_end_to_end(chatty_target_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sp, "MIN_WORDS", 1)
    data = write_jsonl(tmp_path / "data.jsonl", prompt_rows(8))
    out = tmp_path / "drafter"
    args = [
        "train",
        "--model",
        str(chatty_target_dir),
        "--data",
        str(data),
        "--self-prompts",
        "6",
        "--out",
        str(out),
        "--held-out",
        "3",
        "--max-new-tokens",
        "8",
        "--steps",
        "3",
        "--batch-tokens",
        "64",
        "--max-param-fraction",
        "0",
        "--tau-prompts",
        "1",
        "--tau-new-tokens",
        "4",
        "--tree-nodes",
        "4",
        "--tree-depth",
        "2",
        "--wandb",
        "disabled",
        "--distill-batch-size",
        "3",
    ]
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads((out / "training.json").read_text())
    reports = {r["source"]: r for r in summary["data"]}
    assert reports["--self-prompts 6"]["rows"] == 6 and reports["--self-prompts 6"]["used"] >= 1
    assert summary["distill"]["requested"] == 8 + reports["--self-prompts 6"]["used"]
    assert (
        sum(summary["mix"]["train"].values()) + sum(summary["mix"]["held_out"].values())
        == (summary["distill"]["requested"])
    )
    assert "self-prompts" in capsys.readouterr().out


def test_no_data_at_all_names_both_options(capsys, tmp_path):
    assert main(["train", "--out", str(tmp_path / "o")]) == 2
    assert "--self-prompts N" in capsys.readouterr().err


def test_negative_count_is_refused(capsys, tmp_path):
    assert main(["train", "--out", str(tmp_path / "o"), "--self-prompts", "-1"]) == 2
    assert "self_prompts must be >= 0" in capsys.readouterr().err
