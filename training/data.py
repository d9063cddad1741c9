"""Training prompts from local JSON/JSONL files or Hugging Face datasets, in five shapes.

Every source goes through ``datasets.load_dataset``: a local ``.json``/``.jsonl`` file (JSON Lines
or one JSON list) through the "json" builder, a ``.txt`` file (one prompt per line) through
"text", anything else as a hub dataset name (``NAME`` or ``NAME:CONFIG``). The shape is detected
from the columns, or named:

    sharegpt  {conversations: [{from: human|gpt|system, value}]}
    openai    {messages: [{role: user|assistant|system, content}]}
    alpaca    {instruction, input?, output? | response?}
    gsm8k     {question, answer?}
    prompt    {prompt} | {text} | {turns: [str, ...]} (MT-bench / Spec-Bench questions)

Each usable row becomes an ``Example``: the chat messages up to the first assistant reply (an
optional system message and the first user turn) plus that reply when the row has one. Replies
are only kept for ``--use-original``: by default the target regenerates them (distillation.py).
Rows that cannot be used are counted by reason and reported; a source with no usable row is an
error that names the columns it saw.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfspec.training.config import FORMATS, DataConfig

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
PROMPT_COLUMNS = ("prompt", "text", "turns")


class Unusable(ValueError):
    """A row that cannot become an example; the message is the reason counted in the report."""


@dataclass(frozen=True)
class Example:
    id: str  # "<source name>:<row index>", the key of the distillation cache
    messages: tuple[tuple[str, str], ...]  # (role, content) up to the reply: system?, user
    response: str | None = None  # the row's own reply, if it has one

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass
class DataReport:
    source: str
    format: str
    rows: int = 0
    used: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)  # reason -> rows
    name: str = ""  # the prefix of its examples' ids ("<name>:<row>")

    def summary(self) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
        return f"{self.source} [{self.format}]: {self.used}/{self.rows} rows used" + (
            f" (skipped: {why})" if why else ""
        )


# ---------------------------------------------------------------------------------------- shapes
def detect_format(columns: list[str]) -> str:
    """The shape of a table from its column names; ValueError when none fits."""
    cols = set(columns)
    for fmt, needed in (
        ("sharegpt", "conversations"),
        ("openai", "messages"),
        ("alpaca", "instruction"),
        ("gsm8k", "question"),
    ):
        if needed in cols:
            return fmt
    if cols & set(PROMPT_COLUMNS):
        return "prompt"
    raise ValueError(
        f"cannot tell the data format from columns {sorted(cols)}; expected one of: conversations "
        "(ShareGPT), messages (OpenAI), instruction (Alpaca), question (GSM8K), prompt/text/turns; "
        "or name it with --data-format"
    )


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise Unusable(f"{what} missing or not text")
    if not value.strip():
        raise Unusable(f"empty {what}")
    return value


def _turns(turns: Any, role_key: str, content_key: str) -> tuple[list[tuple[str, str]], str | None]:
    """Chat turns -> (messages up to the first reply, that reply or None)."""
    if not isinstance(turns, list) or not turns:
        raise Unusable("no conversation turns")
    messages: list[tuple[str, str]] = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise Unusable("conversation turn is not an object")
        role = ROLES.get(str(turn.get(role_key, "")).lower())
        if role is None:
            raise Unusable("unknown role in conversation")
        content = turn.get(content_key)
        if role == "assistant":
            if not any(r == "user" for r, _ in messages):
                raise Unusable("conversation starts with an assistant turn")
            return messages, content if isinstance(content, str) and content.strip() else None
        if role == "system" and messages:
            raise Unusable("system message after the first turn")
        messages.append((role, _text(content, f"{role} turn")))
        if role == "user" and len(messages) > 1 and messages[-2][0] == "user":
            raise Unusable("two user turns in a row")
    if not any(r == "user" for r, _ in messages):
        raise Unusable("no user turn")
    return messages, None


def _optional(row: dict[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


def parse_row(row: dict[str, Any], fmt: str) -> tuple[list[tuple[str, str]], str | None]:
    """One table row -> (messages, original reply or None); raises Unusable with the reason."""
    if fmt == "sharegpt":
        return _turns(row.get("conversations"), "from", "value")
    if fmt == "openai":
        return _turns(row.get("messages"), "role", "content")
    if fmt == "alpaca":
        prompt = _text(row.get("instruction"), "instruction")
        extra = _optional(row, "input")
        return [("user", f"{prompt}\n\n{extra}" if extra else prompt)], _optional(row, "output", "response")
    if fmt == "gsm8k":
        return [("user", _text(row.get("question"), "question"))], _optional(row, "answer")
    if fmt == "prompt":
        if "turns" in row and row["turns"] is not None:
            turns = row["turns"]
            if not isinstance(turns, list) or not turns:
                raise Unusable("no turns")
            return [("user", _text(turns[0], "first turn"))], None
        return [("user", _text(row.get("prompt", row.get("text")), "prompt"))], _optional(
            row, "response", "output"
        )
    raise ValueError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")


# --------------------------------------------------------------------------------------- loading
def open_source(source: str, split: str = "train", cache_dir: str | None = None):
    """A ``datasets.Dataset`` for a local file or a hub dataset name."""
    import datasets

    path = Path(source).expanduser()
    if path.suffix in (".json", ".jsonl", ".txt") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        builder = "text" if path.suffix == ".txt" else "json"
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
        except Exception as e:
            raise ValueError(
                f"cannot read {path} as {'text' if builder == 'text' else 'JSON or JSON Lines'}: "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from e
    name, _, config = source.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split, cache_dir=cache_dir)
    except Exception as e:
        raise ValueError(
            f"cannot load dataset {source!r} (split {split!r}): {str(e).splitlines()[0] if str(e) else e!r}; "
            "check the name, the split, your network or HF_DATASETS_OFFLINE, or pass a local file"
        ) from e


def load_examples(source: str, config: DataConfig, seed: int = 0) -> tuple[list[Example], DataReport]:
    """Usable examples of one source, and the count of rows skipped by reason."""
    table = open_source(source, config.split, config.cache_dir)
    fmt = detect_format(table.column_names) if config.format == "auto" else config.format
    name = Path(source).stem if Path(source).expanduser().exists() else source
    report = DataReport(source=source, format=fmt, rows=len(table), name=name)
    order = list(range(len(table)))
    if config.max_per_source and config.max_per_source < len(order):
        order = sorted(random.Random(seed).sample(order, config.max_per_source))
    examples = []
    for i in order:
        try:
            messages, response = parse_row(table[i], fmt)
        except Unusable as e:
            report.skipped[str(e)] += 1
            continue
        examples.append(Example(id=f"{name}:{i}", messages=tuple(messages), response=response))
    report.used = len(examples)
    report.rows = len(order)
    if not examples:
        raise ValueError(
            f"{source} has no usable row as {fmt} data ({report.summary()}; columns: "
            f"{table.column_names}); check --data-format or the file"
        )
    return examples, report


def load_all(config: DataConfig, seed: int = 0) -> tuple[list[Example], list[DataReport]]:
    """Examples of every source, shuffled together with ``seed``."""
    if not config.sources and not config.self_prompts:
        raise ValueError(
            "no training data given; pass --data FILE_OR_DATASET (repeatable) or --self-prompts N"
        )
    examples, reports = [], []
    names = [Path(s).stem if Path(s).expanduser().exists() else s for s in config.sources]
    if len(set(names)) != len(names):
        raise ValueError(
            f"two data sources share a name ({names}); example ids (name:row) would collide, rename one"
        )
    if config.self_prompts and "self" in names:
        raise ValueError(
            "a data source is named 'self', which --self-prompts uses for its example ids; rename it"
        )
    for source in config.sources:
        found, report = load_examples(source, config, seed)
        examples += found
        reports.append(report)
    examples = dedupe(examples, reports)
    random.Random(seed).shuffle(examples)
    return examples, reports


DUPLICATE = "duplicate prompt"


def source_name(example: Example) -> str:
    """The data source an example came from (the prefix of its id)."""
    return example.id.rsplit(":", 1)[0]


def dedupe(examples: list[Example], reports: list[DataReport]) -> list[Example]:
    """``examples`` without the ones whose prompt (every message, with whitespace runs and case
    folded) repeats an earlier one; the first occurrence is kept, and each dropped example is
    counted in its source's report (skipped: "duplicate prompt"). The same question in two files,
    or a self-written prompt a file already has, is distilled and trained on once."""
    by_name = {r.name: r for r in reports}
    seen: set[tuple] = set()
    kept = []
    for e in examples:
        key = tuple((role, " ".join(content.split()).casefold()) for role, content in e.messages)
        if key in seen:
            report = by_name.get(source_name(e))
            if report is not None:
                report.skipped[DUPLICATE] += 1
                report.used -= 1
            continue
        seen.add(key)
        kept.append(e)
    return kept


def mix(examples: list[Example]) -> dict[str, int]:
    """Examples per source, largest first: what a run actually trains (or holds out) on."""
    return dict(Counter(source_name(e) for e in examples).most_common())


def mix_summary(train: list[Example], held_out: list[Example]) -> str:
    held = mix(held_out)
    total = max(len(train), 1)
    parts = [
        f"{name} {n} ({100 * n / total:.0f}%) + {held.get(name, 0)} held out"
        for name, n in mix(train).items()
    ]
    return f"data mix: {len(train)} training prompts: " + ", ".join(parts)


def split_held_out(examples: list[Example], count: int) -> tuple[list[Example], list[Example]]:
    """(training examples, ``count`` held-out examples for calibration and tau)."""
    if count >= len(examples):
        raise ValueError(f"cannot hold out {count} of {len(examples)} examples; add data or lower --held-out")
    return examples[count:], examples[:count]
