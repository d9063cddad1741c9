"""Training data: every row shape, auto-detection, counted unusable rows, clear errors."""

import json

import pytest

from selfspec.training import data
from selfspec.training.data import DataConfig, load_all, load_examples
from tests.helpers import write_jsonl

SHAPES = [
    (
        "sharegpt",
        {
            "conversations": [
                {"from": "system", "value": "be brief"},
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "hello"},
                {"from": "human", "value": "more"},
            ]
        },
        (("system", "be brief"), ("user", "hi")),
        "hello",
    ),
    (
        "openai",
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        (("user", "2+2?"),),
        "4",
    ),
    (
        "alpaca",
        {"instruction": "translate", "input": "chat", "output": "cat"},
        (("user", "translate\n\nchat"),),
        "cat",
    ),
    (
        "alpaca",
        {"instruction": "write code", "input": "", "response": "print(1)"},
        (("user", "write code"),),
        "print(1)",
    ),
    ("gsm8k", {"question": "3*3?", "answer": "9 #### 9"}, (("user", "3*3?"),), "9 #### 9"),
    ("prompt", {"prompt": "tell me"}, (("user", "tell me"),), None),
    ("prompt", {"text": "plain text"}, (("user", "plain text"),), None),
    ("prompt", {"question_id": 1, "turns": ["first", "second"]}, (("user", "first"),), None),
]


def _cfg(path, **kw):
    return DataConfig(sources=[str(path)], cache_dir=str(path.parent / "hf"), **kw)


@pytest.mark.parametrize("fmt, row, messages, response", SHAPES)
def test_each_shape_auto_detected(tmp_path, fmt, row, messages, response):
    path = write_jsonl(tmp_path / "d.jsonl", [row, row])
    examples, report = load_examples(str(path), _cfg(path))
    assert report.format == fmt and report.used == 2 and not report.skipped
    assert examples[0].messages == messages and examples[0].response == response
    assert examples[0].id == "d:0" and examples[1].id == "d:1"


def test_json_list_file_and_named_format(tmp_path):
    path = tmp_path / "alp.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]))
    examples, report = load_examples(str(path), _cfg(path, format="alpaca"))
    assert [e.messages[0][1] for e in examples] == ["a", "c"] and report.format == "alpaca"


def test_text_file_is_one_prompt_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\nsecond prompt\n")
    examples, report = load_examples(str(path), _cfg(path))
    assert report.format == "prompt" and [e.messages for e in examples] == [
        (("user", "first prompt"),),
        (("user", "second prompt"),),
    ]


def test_unusable_rows_are_counted_by_reason(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "ok"}, {"from": "gpt", "value": "fine"}]},
        {"conversations": [{"from": "gpt", "value": "I start"}]},
        {"conversations": [{"from": "human", "value": "   "}]},
        {"conversations": [{"from": "alien", "value": "zzz"}]},
        {"conversations": []},
    ]
    examples, report = load_examples(str(path := write_jsonl(tmp_path / "s.jsonl", rows)), _cfg(path))
    assert len(examples) == 1 and report.rows == 5 and report.used == 1
    assert report.skipped == {
        "conversation starts with an assistant turn": 1,
        "empty user turn": 1,
        "unknown role in conversation": 1,
        "no conversation turns": 1,
    }
    assert "1/5 rows used" in report.summary() and "unknown role" in report.summary()


def test_file_without_usable_rows_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": ""}, {"instruction": "  "}])
    with pytest.raises(ValueError, match=r"bad.jsonl has no usable row as alpaca data .*0/2 rows used"):
        load_examples(str(path), _cfg(path))


def test_unknown_columns_name_what_was_expected(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"foo": 1}])
    with pytest.raises(ValueError, match=r"cannot tell the data format from columns \['foo'\]"):
        load_examples(str(path), _cfg(path))


def test_malformed_and_missing_files(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"}\n{not json\n')
    with pytest.raises(ValueError, match="cannot read .*broken.jsonl as JSON"):
        load_examples(str(tmp_path / "broken.jsonl"), _cfg(tmp_path / "broken.jsonl"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_examples(str(tmp_path / "nope.jsonl"), _cfg(tmp_path / "nope.jsonl"))


def test_hub_names_go_through_load_dataset(monkeypatch, tmp_path):
    import datasets

    calls = []

    def fake_load(name, config=None, split=None, cache_dir=None, **kw):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"question": "q1", "answer": "a1"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    examples, report = load_examples("openai/gsm8k:main", DataConfig(sources=["x"], split="test"))
    assert calls == [("openai/gsm8k", "main", "test")]
    assert report.format == "gsm8k" and examples[0].id == "openai/gsm8k:main:0"


def test_sampling_per_source_and_mixing_is_seeded(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}"} for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}"} for i in range(20)])
    cfg = DataConfig(sources=[str(a), str(b)], max_per_source=5, cache_dir=str(tmp_path / "hf"))
    first, reports = load_all(cfg, seed=3)
    again, _ = load_all(cfg, seed=3)
    other, _ = load_all(cfg, seed=4)
    assert [e.id for e in first] == [e.id for e in again] != [e.id for e in other]
    assert len(first) == 10 and [r.used for r in reports] == [5, 5]


def test_duplicate_prompts_across_sources_are_kept_once_and_reported(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Name a  color."}, {"prompt": "add 2 and 3"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "name a color."}, {"prompt": "spell cat"}])
    examples, reports = load_all(DataConfig(sources=[str(a), str(b)], cache_dir=str(tmp_path / "hf")))
    assert sorted(e.id for e in examples) == ["a:0", "a:1", "b:1"]  # whitespace and case do not count
    assert [r.used for r in reports] == [2, 1] and reports[1].skipped == {data.DUPLICATE: 1}
    assert "1 duplicate prompt" in reports[1].summary()
    assert data.mix(examples) == {"a": 2, "b": 1}
    line = data.mix_summary(examples[:2], examples[2:])
    assert line.startswith("data mix: 2 training prompts") and "held out" in line


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(format="csv"), "unknown data format 'csv'"),
        (dict(max_per_source=-1), "max_per_source must be >= 0"),
    ],
)
def test_bad_data_config(kw, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(sources=["x.jsonl"], **kw)


def test_held_out_split_needs_enough_examples():
    ex = [data.Example(id=str(i), messages=(("user", "p"),)) for i in range(3)]
    train, held = data.split_held_out(ex, 1)
    assert len(train) == 2 and len(held) == 1
    with pytest.raises(ValueError, match="cannot hold out 3 of 3"):
        data.split_held_out(ex, 3)
