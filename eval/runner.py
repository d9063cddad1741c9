"""The eval loop: every method on the same prompts, in one process, interleaved.

For each question (and each turn with ``turns="all"``) every method generates from the same
prompt ``repeats`` times; within a repeat the methods run one after another in an order that
rotates with the question and the repeat, so slow drift of the machine (thermal, other jobs)
spreads over all methods instead of biasing one. Each method warms up first. A record keeps the
medians over repeats. With ``turns="all"`` the answer fed back for the next turn is the reference
method's (``hf`` when run, else the first method's), so every method sees the same conversation.

Finished questions are appended to ``records.jsonl`` as they complete; ``resume`` skips them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selfspec.eval import methods as M
from selfspec.eval.config import EvalConfig
from selfspec.eval.measure import PeakMemory, StepTimer, environment, param_bytes, synchronize
from selfspec.eval.metrics import median, mismatch_rows, summarize
from selfspec.eval.questions import Question, conversation, encode_conversation, load_questions
from selfspec.eval.report import write_plots, write_report
from selfspec.eval.results import (
    RESULTS,
    SCHEMA_VERSION,
    RecordLog,
    atomic_write_json,
    flatten,
    read_state,
    start_session,
)
from selfspec.eval.tracking import Tracker

WARMUP_TOKENS = 32  # warm-up generations are capped: they only need every code path to run once


@dataclass
class Context:
    """What the loop needs, loaded once."""

    config: EvalConfig
    model: Any
    tokenizer: Any
    methods: dict[str, Any]  # name -> HFMethod | SelfspecMethod
    models_info: dict[str, Any]
    memory: PeakMemory
    dtype: str
    session: int = 0  # index of this invocation in state.json's sessions

    @property
    def reference(self) -> str:
        return "hf" if "hf" in self.methods else next(iter(self.methods))


# ----------------------------------------------------------------------------------------- loading
def load(config: EvalConfig) -> Context:
    """Load the target (and drafter, assistant) and build the methods."""
    import selfspec
    from selfspec.lookup import Lookup
    from selfspec.options import pick_drafter

    if config.threads:
        torch.set_num_threads(config.threads)
    model, tokenizer = selfspec.load_target(config.model, dtype=config.dtype, device=config.device)
    drafter = (
        pick_drafter(config.drafter, model, quiet=True)
        if set(config.methods) & set(M.NEEDS_DRAFTER)
        else None
    )
    assistant = None
    if "assisted" in config.methods:
        assistant, assistant_tok = selfspec.load_target(
            config.assistant, dtype=config.dtype, device=config.device
        )
        M.check_same_tokenizer(tokenizer, assistant_tok, config.assistant)
    methods = M.build_methods(
        config.methods,
        model,
        tokenizer,
        drafter,
        assistant,
        config.pld_tokens,
        tree=config.tree,
        acceptance=config.acceptance,
        verify=config.verify,
        candidates=config.candidates,
        lookup=Lookup(max_len=config.lookup_len),
        vllm={
            "python": config.vllm_python,
            "model": config.model,
            "dtype": str(model.dtype).removeprefix("torch."),
            "out": config.out,
            "drafter": config.drafter,
            "k": config.vllm_k,
        },
    )
    info = models_info(config, model, drafter, assistant)
    return Context(config, model, tokenizer, methods, info, PeakMemory(model.device), info["target"]["dtype"])


def models_info(config: EvalConfig, model: Any, drafter: Any, assistant: Any) -> dict[str, Any]:
    """Names and parameter bytes; the drafter's own bytes are its memory overhead on the target."""
    target_bytes = param_bytes(model)
    dtype = str(model.dtype).removeprefix("torch.")
    info: dict[str, Any] = {
        "target": {"name": config.model, "dtype": dtype, "param_bytes": target_bytes},
        "drafter": None,
        "assistant": None,
    }
    if drafter is not None:
        own = param_bytes(drafter)
        info["drafter"] = {
            "name": config.drafter,
            "kind": drafter.kind,
            "param_bytes": own,
            "overhead_vs_target": own / target_bytes,
        }
    if assistant is not None:
        info["assistant"] = {"name": config.assistant, "param_bytes": param_bytes(assistant)}
    return info


# ------------------------------------------------------------------------------------ measuring
def timed_run(ctx: Context, name: str, ids: torch.Tensor, max_new_tokens: int) -> dict[str, Any]:
    """One generation of one method, with wall time, TTFT, tokens per forward and peak memory."""
    device = ctx.model.device
    timer = StepTimer()
    ctx.memory.reset()
    synchronize(device)
    timer.start = time.perf_counter()
    out = ctx.methods[name].generate(ids, max_new_tokens, ctx.config.sampling(), timer)
    synchronize(device)
    wall = time.perf_counter() - timer.start
    return {
        **out,
        "wall_s": wall,
        "ttft_s": timer.first_token_s,
        "step_tokens": timer.step_tokens,
        "peak_mem_bytes": ctx.memory.peak(),
    }


def rotation(names: list[str], offset: int) -> list[str]:
    k = offset % len(names)
    return names[k:] + names[:k]


def warm_up(ctx: Context, question: Question) -> None:
    ids = encode_conversation(ctx.tokenizer, conversation(question, []), ctx.config.chat)
    for name in ctx.methods:
        for _ in range(ctx.config.warmup):
            timed_run(ctx, name, ids, min(ctx.config.max_new_tokens, WARMUP_TOKENS))


def _hist(step_tokens: list[int]) -> list[int]:
    hist = [0] * (max(step_tokens, default=0) + 1)
    for n in step_tokens:
        hist[n] += 1
    return hist


def make_record(
    ctx: Context, q: Question, turn: int, name: str, runs: list[dict[str, Any]], prompt_tokens: int
) -> dict[str, Any]:
    """Medians over the repeats of one method on one turn (see results.py for the fields)."""
    first = runs[0]
    tokens = first["tokens"]
    if "accepted_hist" in first:  # selfspec.generate's own stats: verify steps after the prefill
        hist, depth = first["accepted_hist"], first["accepted_by_depth"]
    else:  # HF: one streamer put per target forward
        hist, depth = _hist(first["step_tokens"]), None
    steps = sum(hist)
    return {
        "key": q.key,
        "question_id": q.question_id,
        "category": q.category,
        "source": q.source,
        "turn": turn + 1,
        "method": name,
        "session": ctx.session,
        "prompt_tokens": prompt_tokens,
        "new_tokens": len(tokens),
        "tokens": tokens,
        "text": ctx.tokenizer.decode(tokens, skip_special_tokens=True),
        "wall_s": median(r["wall_s"] for r in runs),
        "tokens_per_s": median(len(r["tokens"]) / r["wall_s"] for r in runs),
        "ttft_s": median(r["ttft_s"] for r in runs),
        "prefill_s": median(r["prefill_s"] for r in runs) if "prefill_s" in first else None,
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in runs),
        "runs": [
            {k: r[k] for k in ("wall_s", "ttft_s", "peak_mem_bytes", "order")}
            | {"new_tokens": len(r["tokens"]), "tree_nodes": r.get("tree_nodes")}
            for r in runs
        ],
        "steps": steps,
        "tau": sum(k * n for k, n in enumerate(hist)) / steps if steps else None,
        "accepted_hist": hist,
        "accepted_by_depth": depth,
        "same_across_repeats": all(r["tokens"] == tokens for r in runs),
        "exact_match": None,
        "mismatch": None,
    }


def check_exact(ctx: Context, records: list[dict[str, Any]], ids: torch.Tensor) -> None:
    """Greedy only: compare every method's tokens with hf's; diagnose the first difference."""
    ref = next((r for r in records if r["method"] == "hf"), None)
    if ref is None or not ctx.config.sampling().greedy:
        return
    for r in records:
        if r is ref:
            continue
        r["exact_match"] = r["tokens"] == ref["tokens"]
        if not r["exact_match"]:
            info = M.diagnose_mismatch(ctx.model, ids, ref["tokens"], r["tokens"])
            r["mismatch"] = {**info, "verdict": M.verdict(info, ctx.dtype)}


def run_turn(ctx: Context, q: Question, index: int, turn: int, ids: torch.Tensor) -> list[dict[str, Any]]:
    names = list(ctx.methods)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(ctx.config.repeats):
        for position, name in enumerate(rotation(names, index * ctx.config.repeats + r + turn)):
            runs[name].append({**timed_run(ctx, name, ids, ctx.config.max_new_tokens), "order": position})
    records = [make_record(ctx, q, turn, n, runs[n], ids.shape[1]) for n in names]
    check_exact(ctx, records, ids)
    return records


def run_question(ctx: Context, q: Question, index: int) -> list[dict[str, Any]]:
    """All turns of one question; later turns see the reference method's earlier answers."""
    answers: list[str] = []
    records: list[dict[str, Any]] = []
    turns = len(q.turns) if ctx.config.turns == "all" else 1
    for turn in range(turns):
        ids = encode_conversation(ctx.tokenizer, conversation(q, answers), ctx.config.chat)  # [1, n]
        turn_records = run_turn(ctx, q, index, turn, ids)
        records += turn_records
        answers.append(next(r["text"] for r in turn_records if r["method"] == ctx.reference))
    return records


# ------------------------------------------------------------------------------------- the eval
def run_eval(config: EvalConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) an eval into ``config.out``; returns the results.json dict. ``argv`` is the
    command recorded in the environment (default: sys.argv)."""
    from tqdm.auto import tqdm

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    questions = load_questions(config.questions, config.limit, config.per_category)
    ctx = load(config)
    ctx.session = start_session(
        out, config.fingerprint(), environment(ctx.model.device, ctx.model.dtype, argv)
    )
    log = RecordLog(out)
    done = log.read()
    todo = [(i, q) for i, q in enumerate(questions) if q.key not in done]
    tracker = Tracker(
        config.wandb, config.wandb_project, out, dataclasses.asdict(config), resume=config.resume
    )
    try:
        if todo and config.warmup:
            warm_up(ctx, todo[0][1])
        bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc="eval", unit="question")
        for index, q in todo:
            records = run_question(ctx, q, index)
            log.append(q.key, ctx.session, records)
            done[q.key] = {"key": q.key, "session": ctx.session, "records": records}
            tracker.log_question(records)
            bar.set_postfix({r["method"]: f"{r['tokens_per_s']:.1f}" for r in records if r["turn"] == 1})
            bar.update()
        bar.close()
        results = finish(ctx, out, questions, done, tracker)
    except BaseException:
        tracker.abort()
        raise
    finally:
        close_methods(ctx)
    tracker.finish_eval(results, out)
    return results


def close_methods(ctx: Context) -> None:
    """Stop what runs outside this process (the vllm methods' workers)."""
    for method in ctx.methods.values():
        if hasattr(method, "close"):
            method.close()


def finish(
    ctx: Context, out: Path, questions: list[Question], done: dict[str, Any], tracker: Tracker
) -> dict[str, Any]:
    """Aggregate the log into results.json, report.md and the plots (each written atomically)."""
    lines = [done[q.key] for q in questions if q.key in done]
    records = flatten(lines)
    summary, by_category = summarize(records, list(ctx.methods))
    state = read_state(out) or {}
    results = {
        "schema_version": SCHEMA_VERSION,
        "complete": len(lines) == len(questions),
        "config": dataclasses.asdict(ctx.config),
        "environment": state.get("sessions", []),
        "models": ctx.models_info,
        "memory_kind": ctx.memory.kind,
        "summary": summary,
        "by_category": by_category,
        "mismatches": mismatch_rows(records),
        "records": records,
        "files": {"records": "records.jsonl", "report": "report.md", "plots": []},
        "wandb": {"mode": ctx.config.wandb, "run_dir": tracker.run_dir, "sync_command": tracker.sync_command},
    }
    results["files"]["plots"] = write_plots(results, out)
    write_report(results, out)
    atomic_write_json(out / RESULTS, results)
    return results
