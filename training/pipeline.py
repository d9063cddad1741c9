"""``selfspec train`` end to end: data (+ prompts the target writes) -> self-distillation -> features ->
training -> calibration.

Every stage caches its output under the work directory and reuses it when run again with the
same settings, so a killed run restarted with ``--resume`` redoes nothing that was finished:
distillation continues after the last fsynced batch, feature capture after the last shard,
training from the last checkpoint. Held-out examples (never trained on) calibrate the tree and
give the tau measured with ``selfspec.generate``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import selfspec
from selfspec.drafters import default_feature_layers
from selfspec.io import atomic_write_text, replacing
from selfspec.models import cpu_has_native_bf16
from selfspec.training import features as feats
from selfspec.training.budget import Rates, parse_duration
from selfspec.training.budget import plan as budget_plan
from selfspec.training.calibration import calibrate
from selfspec.training.config import FeatureConfig, Settings
from selfspec.training.data import dedupe, load_all, mix, mix_summary, split_held_out
from selfspec.training.distillation import distill, read_responses, sequences
from selfspec.training.self_prompts import write_prompts
from selfspec.training.trainer import Trainer, measure_tau
from selfspec.training.utils import Dist


def save_drafter(drafter: selfspec.Drafter, out: Path, dtype: str) -> Path:
    """``save_pretrained`` then store float weights in ``dtype`` (load upcasts to the target's)."""
    from safetensors.torch import load_file, save_file

    from selfspec.drafters.base import WEIGHTS_NAME

    drafter.save_pretrained(out)
    path = out / WEIGHTS_NAME
    state = {
        k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v
        for k, v in load_file(str(path)).items()
    }
    with replacing(path) as tmp:
        save_file(state, tmp, metadata={"kind": drafter.kind})
    return out


def _say(dist: Dist, text: str) -> None:
    if dist.is_main:
        print(f"[train] {text}", flush=True)


def drafter_feature_layers(kind: str, model: Any) -> list[int]:
    """The target layers (hidden_states indices) a drafter of ``kind`` fuses; [] = the last state only."""
    if kind not in ("eagle3", "block"):
        return []
    return default_feature_layers(model.config.get_text_config().num_hidden_layers)


def data_dtype(setting: str, model: Any) -> torch.dtype:
    """The target dtype of the data stages: ``setting``, or for auto bf16 where the device computes
    it natively (batched bf16 GEMMs there run several times faster than fp32 ones; see
    benchmarks/README.md), else the training dtype."""
    if setting != "auto":
        return getattr(torch, setting)
    if model.device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else model.dtype
    return torch.bfloat16 if model.device.type == "cpu" and cpu_has_native_bf16() else model.dtype


def fit_budget(
    s: Settings,
    model: Any,
    train_model: Any,
    tokenizer: Any,
    train_ex: list[Any],
    held_ex: list[Any],
    fconfig: FeatureConfig,
    work: Path,
    dist: Dist,
    started: float,
) -> tuple[list[Any], dict[str, Any]]:
    """Measure the stages' rates on one distillation batch (its replies land in the real cache, so
    nothing is wasted), plan prompts and steps for ``--time-budget`` (``selfspec.training.budget``)
    and return the planned training examples (a seeded sample across sources) and the plan. The
    plan is kept in the work dir: a resumed run follows it instead of probing again."""
    path = work / "budget_plan.json"
    order = list(train_ex)
    random.Random(s.train.seed).shuffle(order)  # any prefix mixes the sources
    if path.is_file():
        kept = json.loads(path.read_text())
        return order[: kept["prompts"]], kept
    done = read_responses(work / "distill")  # e.g. a run killed during its probe: time new prompts
    probe = [e for e in order if e.id not in done][: max(s.distill.batch_size, 8)]
    records, drep = distill(
        model, tokenizer, probe, work / "distill", dataclasses.replace(s.distill, check=0), dist
    )
    if drep.seconds <= 0 or drep.new_tokens == 0:
        raise ValueError(
            f"every prompt is already distilled in {work}, so --time-budget cannot time distillation; "
            "use a new --work-dir, or --steps instead of --time-budget"
        )
    # Captured into the real training cache (the probe prompts are training prompts), so the
    # capture stage later finds them done; only the probe's training is thrown away.
    train_dir = work / "features" / "train"
    frep = feats.capture(model, list(sequences(records)), train_dir, fconfig, dist)
    rate_capture = (frep.tokens - frep.cached_tokens) / max(frep.seconds, 1e-9)
    probe_dir = work / "budget_probe"
    sequences_ = feats.load(train_dir, fconfig.feature_layers)
    steps = 6
    probe_train = dataclasses.replace(
        s.train,
        steps=steps,
        checkpoint_every=10**9,
        eval_every=0,
        tau_prompts=0,
        log_every=steps,
        warmup_steps=0,
    )
    trainer = Trainer(train_model, sequences_, probe_train, probe_dir / "train", wandb_mode="disabled")
    train_rate = trainer.train().tokens_per_s
    shutil.rmtree(probe_dir, ignore_errors=True)
    rates = Rates(drep.new_tokens / drep.seconds, rate_capture, train_rate)
    prompt_tokens = statistics.mean(len(r["prompt_ids"]) for r in records)
    reply_tokens = statistics.mean(len(r["response_ids"]) for r in records)
    held = len(held_ex) * (
        reply_tokens / rates.distill_tok_s + (prompt_tokens + reply_tokens) / rates.capture_tok_s
    )
    budget = parse_duration(s.run.time_budget)
    # Already spent (model load, probe) + held-out data + calibration, tau and saving (a reserve).
    fixed = time.perf_counter() - started + held + 0.05 * budget + 30
    batch_rows = s.train.batch_tokens * s.train.grad_accum * dist.world_size
    p = budget_plan(
        budget,
        rates,
        available_prompts=len(order),
        prompt_tokens=prompt_tokens,
        reply_tokens=reply_tokens,
        batch_tokens=batch_rows,
        fixed_s=fixed,
        max_tokens=s.features.max_tokens,
    )
    kept = {
        "prompts": p.prompts,
        "steps": p.steps,
        "epochs": round(p.epochs, 2),
        "limited_by": p.limited_by,
        "budget_s": budget,
        "planned_s": {k: round(v, 1) for k, v in p.seconds.items()},
        "rates": dataclasses.asdict(rates),
        "prompt_tokens": prompt_tokens,
        "reply_tokens": reply_tokens,
        "summary": p.summary(),
    }
    if dist.is_main:
        atomic_write_text(path, json.dumps(kept, indent=1) + "\n")
    dist.barrier()
    return order[: p.prompts], kept


def _stage_data(
    s: Settings, model: Any, tokenizer: Any, work: Path, dist: Dist, started: float
) -> dict[str, Any]:
    """Load the examples, self-distill them, capture features; returns what training needs. The
    data stages run on a copy of the target in ``data_dtype`` when that differs from the training
    dtype (the copy is freed before training). With a time budget, the training examples and
    ``s.train.steps`` are cut to the plan first."""
    train_model, dtype = model, data_dtype(s.run.data_dtype, model)
    if dtype != model.dtype:
        _say(dist, f"data stages run the target in {str(dtype).removeprefix('torch.')}")
        with torch.no_grad():
            model = copy.deepcopy(model).to(dtype)
    examples, reports = load_all(s.data, seed=s.train.seed)
    if s.data.self_prompts:
        written, report = write_prompts(
            model,
            tokenizer,
            s.data.self_prompts,
            work / "self_prompts",
            s.distill.batch_size,
            seed=s.train.seed,
            dist=dist,
        )
        examples, reports = dedupe(examples + written, reports + [report]), reports + [report]
        random.Random(s.train.seed).shuffle(examples)  # held-out examples come from every source
    for r in reports:
        _say(dist, r.summary())
    train_ex, held_ex = split_held_out(examples, s.run.held_out)
    fused = drafter_feature_layers(s.train.kind, model)  # EAGLE-3 and block read these layers as well
    fconfig = dataclasses.replace(
        s.features, feature_layers=list(dict.fromkeys([*s.features.feature_layers, *fused]))
    )
    planned = None
    if s.run.time_budget:
        train_ex, planned = fit_budget(
            s, model, train_model, tokenizer, train_ex, held_ex, fconfig, work, dist, started
        )
        s.train.steps = planned["steps"]
        _say(dist, planned["summary"])
    _say(dist, mix_summary(train_ex, held_ex))
    records, dreport = distill(model, tokenizer, train_ex + held_ex, work / "distill", s.distill, dist)
    _say(dist, dreport.summary())
    held_ids = {e.id for e in held_ex}
    items = list(sequences(records))
    freport = feats.capture(
        model, [i for i in items if i[0] not in held_ids], work / "features" / "train", fconfig, dist
    )
    hreport = feats.capture(
        model, [i for i in items if i[0] in held_ids], work / "features" / "held_out", fconfig, dist
    )
    _say(dist, freport.summary())
    did = {  # what this invocation itself computed, per stage (a resumed run finds the rest cached)
        "distill": dreport.generated > 0,
        "features": freport.tokens > freport.cached_tokens,
        "held_out_features": hreport.tokens > hreport.cached_tokens,
    }
    stage_reports = {
        "distill": dataclasses.asdict(dreport),
        "features": dataclasses.asdict(freport),
        "held_out_features": dataclasses.asdict(hreport),
    }
    history = stage_history(work, stage_reports, did, dist)
    return {
        "train": feats.load(work / "features" / "train", fused),
        "held_out": feats.load(work / "features" / "held_out", fused),
        "tau_prompts": [r["prompt_ids"] for r in records if r["id"] in held_ids],
        "reports": {
            "data": [dataclasses.asdict(r) | {"skipped": dict(r.skipped)} for r in reports],
            "mix": {"train": mix(train_ex), "held_out": mix(held_ex)},
            **{k: v | {"runs": history[k]} for k, v in stage_reports.items()},
            **({"time_budget": planned} if planned else {}),
        },
    }


def stage_history(
    work: Path, reports: dict[str, dict[str, Any]], did: dict[str, bool], dist: Dist
) -> dict[str, list[dict[str, Any]]]:
    """Each stage's report from every invocation that did work in it, oldest first, kept in
    ``work/stage_reports.json``: a resumed run's summary keeps what the earlier runs distilled and
    captured (their counts and seconds) instead of showing only its own cache hits."""
    path = work / "stage_reports.json"
    history = json.loads(path.read_text()) if path.is_file() else {}
    for stage, report in reports.items():
        if did[stage]:
            history.setdefault(stage, []).append(report)
    if dist.is_main:
        atomic_write_text(path, json.dumps(history, indent=1) + "\n")
    return {stage: history.get(stage, []) for stage in reports}


def _finish(
    s: Settings, trainer: Trainer, result: Any, data: dict[str, Any], model: Any, started: float
) -> dict[str, Any]:
    """Calibrate the tree on held-out data, measure tau with it, save the drafter and the summary."""
    out, drafter = Path(s.run.out), trainer.drafter
    cal = calibrate(drafter, model, data["held_out"], s.calibrate)
    _say(trainer.dist, cal.summary())
    tau = measure_tau(
        model, drafter, data["tau_prompts"][: max(1, s.train.tau_prompts)], s.train.tau_new_tokens
    )
    save_drafter(drafter, out, s.run.save_dtype)
    summary = {
        "out": str(out),
        "kind": drafter.kind,
        "own_parameters": drafter.num_parameters_own(),
        **data["reports"],
        "train": {
            "steps": result.step,
            "seconds": round(result.seconds, 1),
            "tokens_per_s": round(result.tokens_per_s, 1),
            "final": result.metrics,
            "tau": result.tau,
        },
        "calibration": {
            "acceptance": cal.acceptance.tolist(),
            "positions": cal.positions,
            "tree": cal.paths,
            "expected_tau": cal.expected_tau,
        },
        "tau_calibrated_tree": tau,
        "wall_s": round(time.perf_counter() - started, 1),
        "settings": s.to_dict(),
    }
    atomic_write_text(out / "training.json", json.dumps(summary, indent=2, default=str) + "\n")
    trainer.tracker.summary({"tau_calibrated_tree": tau, "expected_tau": cal.expected_tau})
    _say(
        trainer.dist,
        f"saved {drafter.kind} drafter ({drafter.num_parameters_own():,} parameters) to {out}; "
        f"held-out tau {tau:.2f} with the calibrated tree",
    )
    return summary


def run(settings: Settings) -> dict[str, Any]:
    """Train a drafter as ``settings`` say; returns the summary also written to OUT/training.json
    (on the main process; other ranks return {})."""
    from accelerate import Accelerator

    s, started, work = settings, time.perf_counter(), Path(settings.run.work_dir)
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=not cuda, mixed_precision="bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    )
    dist = Dist.from_accelerator(accelerator)
    # Training keeps fp32 on CPU (the drafter trains in the target's dtype); load_target's own CPU
    # default is bf16 where the CPU has native bf16, which is for decoding.
    dtype = s.run.dtype or ("float32" if accelerator.device.type == "cpu" else None)
    model, tokenizer = selfspec.load_target(s.run.model, dtype=dtype, device=accelerator.device)
    if s.run.overwrite and dist.is_main:
        shutil.rmtree(work, ignore_errors=True)
    dist.barrier()
    data = _stage_data(s, model, tokenizer, work, dist, started)
    trainer = Trainer(
        model,
        data["train"],
        s.train,
        work,
        tau_prompts=data["tau_prompts"],
        wandb_mode=s.run.wandb,
        wandb_project=s.run.wandb_project,
        accelerator=accelerator,
        wandb_resume=s.run.resume,
    )
    trainer.tracker.summary({"settings": s.to_dict()})
    result = trainer.train(resume=s.run.resume)
    summary = _finish(s, trainer, result, data, model, started) if dist.is_main else {}
    hint = trainer.tracker.finish()
    if hint:
        _say(dist, f"W&B run saved offline; upload it with: {hint}")
    accelerator.wait_for_everyone()
    return summary
