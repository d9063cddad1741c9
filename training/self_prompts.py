"""Prompts written by the target itself (``--self-prompts N``), for training without a dataset.

An instruction-tuned model has learned what its users ask. Given only its chat template's opening
of a user turn (everything the template renders before the user's text: system prompt, role
header), it samples a plausible user message and ends the turn. Those messages are prompts in the
target's own instruction distribution, across whatever topics it was tuned on, which is what the
drafter will later see; self-distillation then writes the replies (the idea of Magpie, Xu et al.
2024). They add to ``--data`` sources or replace them.

Sampling is fixed (temperature 1, top-p 0.95, at most 96 tokens) for varied but coherent
questions. A message is kept when the model ended the turn itself, has at least three words and
is not a repeat; the rest are counted by reason. Generation is batched and cached like the
distillation (``prompts.rank<r>.jsonl``, appended and fsynced per batch, a torn last line cut,
``self_prompts.json`` refusing a cache made with other settings); each batch's draws are seeded by
its index, so a resumed or re-run stage (or one asked for more prompts) writes the same prompts.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from selfspec.sampling import SamplingConfig
from selfspec.training.data import DataReport, Example
from selfspec.training.distillation import check_manifest, eos_and_pad, generate_batch, read_responses
from selfspec.training.utils import Dist, progress

SOURCE = "self"  # example ids are "self:<n>"
TEMPERATURE, TOP_P, MAX_TOKENS, MIN_WORDS = 1.0, 0.95, 96, 3
_SENTINEL = "\x00selfspec-user-text\x00"


def user_turn_header(tokenizer: Any) -> list[int]:
    """Token ids the chat template puts before a user's text in a first turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "--self-prompts needs a tokenizer with a chat template (an instruction-tuned model): "
            "the model writes prompts after the template's user-turn header; pass --data instead"
        )
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False)
    if _SENTINEL not in text:
        raise ValueError(
            "the chat template does not render the user's text verbatim, so no user-turn header "
            "can be cut from it; pass --data instead of --self-prompts"
        )
    return list(tokenizer(text[: text.index(_SENTINEL)], add_special_tokens=False)["input_ids"])


def _shard(work_dir: Path, rank: int) -> Path:
    return work_dir / f"prompts.rank{rank}.jsonl"


def write_prompts(
    model: Any,
    tokenizer: Any,
    count: int,
    work_dir: Path,
    batch_size: int,
    seed: int = 0,
    dist: Dist | None = None,
) -> tuple[list[Example], DataReport]:
    """``count`` attempts at a prompt (cached ones reused); the usable ones as examples, in order."""
    dist = dist or Dist.single()
    header = user_turn_header(tokenizer)
    settings = {
        "target": Path(getattr(model, "name_or_path", "") or "").name or type(model).__name__,
        "header": header,
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
        "max_tokens": MAX_TOKENS,
        "batch_size": batch_size,
        "seed": seed,
    }  # batches are seeded by index: their size matters
    check_manifest(work_dir, settings, dist, name="self_prompts.json")
    own = _shard(work_dir, dist.rank)
    done = read_responses(work_dir, own, pattern="prompts.rank*.jsonl")
    dist.barrier()
    # Whole windows of batch_size attempts, whatever ``count`` is: an attempt's draws depend only on
    # (seed, batch_size, index), so asking for more prompts later keeps the ones already written.
    batches = [range(lo, lo + batch_size) for lo in range(0, count, batch_size)]
    todo = [b for b in batches if any(f"{SOURCE}:{i}" not in done for i in b)][dist.rank :: dist.world_size]
    _generate(model, tokenizer, header, todo, own, seed, dist)
    dist.barrier()
    return usable(read_responses(work_dir, pattern="prompts.rank*.jsonl"), count)


def _generate(
    model, tokenizer, header: list[int], todo: list[range], own: Path, seed: int, dist: Dist
) -> None:
    sampling = SamplingConfig(temperature=TEMPERATURE, top_p=TOP_P)
    eos, pad = eos_and_pad(model, tokenizer)
    bar = progress(
        total=sum(len(b) for b in todo), desc="self-prompts", unit="prompt", disable=not dist.is_main
    )
    start, tokens = time.perf_counter(), 0
    with open(own, "a", encoding="utf-8") as sink:
        for batch in todo:
            generator = torch.Generator(device=model.device).manual_seed(
                seed ^ zlib.crc32(f"{SOURCE}:{batch[0]}".encode())
            )
            outs = generate_batch(model, [header] * len(batch), MAX_TOKENS, sampling, eos, pad, generator)
            lines = [
                json.dumps(
                    {
                        "id": f"{SOURCE}:{i}",
                        "text": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                        "finished": bool(ids) and ids[-1] in eos,
                    }
                )
                for i, ids in zip(batch, outs)
            ]
            sink.write("".join(line + "\n" for line in lines))
            sink.flush()
            os.fsync(sink.fileno())
            tokens += sum(len(o) for o in outs)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
    bar.close()


def usable(records: dict[str, dict[str, Any]], count: int) -> tuple[list[Example], DataReport]:
    """The kept prompts of attempts 0..count-1 as examples, and the count dropped by reason."""
    report, seen, examples = (
        DataReport(source=f"--self-prompts {count}", format="written by the target", name=SOURCE),
        set(),
        [],
    )
    for i in range(count):
        record = records.get(f"{SOURCE}:{i}")
        if record is None:
            continue
        report.rows += 1
        text = record["text"]
        if not record["finished"]:
            report.skipped["did not end the turn"] += 1
        elif len(text.split()) < MIN_WORDS:
            report.skipped[f"under {MIN_WORDS} words"] += 1
        elif " ".join(text.lower().split()) in seen:
            report.skipped["repeated"] += 1
        else:
            seen.add(" ".join(text.lower().split()))
            examples.append(Example(id=f"{SOURCE}:{i}", messages=(("user", text),)))
    report.used = len(examples)
    if not examples:
        raise ValueError(f"the target wrote no usable prompt ({report.summary()}); pass --data instead")
    return examples, report
