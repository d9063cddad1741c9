"""Evaluation questions in the MT-bench / Spec-Bench format, and the prompts built from them.

One JSON object per line: ``{"question_id": 81, "category": "writing", "turns": ["...", "..."]}``
(extra fields such as ``reference`` are ignored). ``turns`` are the user's messages; with
``--turns all`` the model's own answer to turn k is put back into the conversation, through the
tokenizer's chat template, before turn k+1 is asked. Questions from several files are told apart
by a key ``"<file stem>:<question_id>"``, which is also what ``--resume`` matches on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class QuestionFileError(ValueError):
    """A question file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Question:
    key: str  # "<file stem>:<question_id>", unique over all files of one eval
    question_id: int | str
    category: str  # the file's field; the file stem when it is missing or empty (alpaca.jsonl)
    turns: tuple[str, ...]  # user messages, at least one
    source: str  # the file it came from


def _parse_line(line: str, where: str, stem: str) -> Question:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise QuestionFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(row, dict):
        raise QuestionFileError(f"{where}: expected a JSON object with question_id, category and turns")
    qid = row.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or qid == "":
        raise QuestionFileError(
            f"{where}: 'question_id' must be an integer or a non-empty string, got {qid!r}"
        )
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise QuestionFileError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
    category = row.get("category") or stem
    if not isinstance(category, str):
        raise QuestionFileError(f"{where}: 'category' must be a string, got {category!r}")
    return Question(key=f"{stem}:{qid}", question_id=qid, category=category, turns=tuple(turns), source="")


def read_questions(path: str | Path, limit: int | None = None) -> list[Question]:
    """The questions of one JSONL file in file order (the first ``limit`` if given).

    Raises QuestionFileError naming the file and line for anything malformed: a missing file,
    invalid JSON, a missing field, a duplicate question_id."""
    path = Path(path)
    if not path.is_file():
        raise QuestionFileError(
            f"question file {path} does not exist"
            if not path.exists()
            else f"question file {path} is not a regular file"
        )
    out: list[Question] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            q = _parse_line(line, f"{path}:{number}", path.stem)
            if q.key in seen:
                raise QuestionFileError(
                    f"{path}:{number}: question_id {q.question_id!r} already used on line {seen[q.key]}"
                )
            seen[q.key] = number
            out.append(Question(q.key, q.question_id, q.category, q.turns, source=str(path)))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise QuestionFileError(f"question file {path} holds no questions")
    return out


def load_questions(
    paths: list[str | Path], limit: int | None = None, per_category: int | None = None
) -> list[Question]:
    """Questions of every file, in order: the first ``limit`` of each file, then at most
    ``per_category`` of each category (in file order). Files with the same stem are refused,
    since their keys would collide."""
    stems: dict[str, str] = {}
    out: list[Question] = []
    for path in paths:
        stem = Path(path).stem
        if stem in stems:
            raise QuestionFileError(
                f"question files {stems[stem]} and {path} have the same name '{stem}'; "
                "rename one (question keys are '<file name>:<question_id>')"
            )
        stems[stem] = str(path)
        out += read_questions(path, limit)
    if per_category is not None:
        counts: dict[str, int] = {}
        kept = []
        for q in out:
            counts[q.category] = counts.get(q.category, 0) + 1
            if counts[q.category] <= per_category:
                kept.append(q)
        out = kept
    return out


def conversation(question: Question, answers: list[str]) -> list[dict[str, str]]:
    """Chat messages for turn ``len(answers)``: every earlier turn with the model's own answer."""
    messages: list[dict[str, str]] = []
    for turn, answer in zip(question.turns, answers):
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": question.turns[len(answers)]})
    return messages


def encode_conversation(tokenizer: Any, messages: list[dict[str, str]], chat: bool):
    """Token ids ``[1, n]`` of the conversation, ready for the assistant's reply.

    With ``chat`` and a tokenizer that has a chat template, the template is applied with the
    generation prompt; otherwise the messages are joined as plain text, one blank line apart."""
    if chat and getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return enc["input_ids"]
    text = "\n\n".join(m["content"] for m in messages)
    return tokenizer(text, return_tensors="pt")["input_ids"]
