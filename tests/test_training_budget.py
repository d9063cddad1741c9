"""--time-budget: the planner's arithmetic (no timing), and a tiny run that follows its plan."""

import json

import pytest
import torch

from selfspec.cli import main
from selfspec.training.budget import Rates, parse_duration, plan
from tests.helpers import prompt_rows, tiny_target_dir, write_jsonl

torch.set_num_threads(1)

RATES = Rates(distill_tok_s=50.0, capture_tok_s=400.0, train_rows_s=1000.0)


@pytest.mark.parametrize(
    "text, seconds",
    [("7200", 7200), ("2h", 7200), ("90m", 5400), ("1h30m", 5400), ("45s", 45), ("1.5h", 5400)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["2 hours", "h", "", "0", "1h-5m", "5d"])
def test_bad_durations_say_how_to_write_one(text):
    with pytest.raises(ValueError, match="duration|positive"):
        parse_duration(text)


def per_prompt(prompt, reply, epochs=3.0, r=RATES):
    return (
        reply / r.distill_tok_s
        + (prompt + reply) / r.capture_tok_s
        + epochs * (prompt + reply) / r.train_rows_s
    )


def test_budget_limited_plan_fills_the_budget_with_three_epochs():
    budget, fixed = 3600.0, 300.0
    p = plan(
        budget,
        RATES,
        available_prompts=10_000,
        prompt_tokens=60,
        reply_tokens=140,
        batch_tokens=1024,
        fixed_s=fixed,
    )
    assert p.limited_by == "budget"
    assert p.prompts == int((budget - fixed) // per_prompt(60, 140))
    assert 2.99 <= p.epochs <= 3.0 + 1024 / (p.prompts * 200)  # 3 epochs, up to one batch more
    assert p.seconds["total"] <= budget and p.seconds["total"] > budget - 2 * per_prompt(60, 140)
    assert p.seconds["fixed"] == fixed


def test_data_limited_plan_spends_the_rest_on_more_steps():
    p = plan(
        3600.0,
        RATES,
        available_prompts=100,
        prompt_tokens=60,
        reply_tokens=140,
        batch_tokens=1024,
        fixed_s=300.0,
    )
    assert p.limited_by == "data" and p.prompts == 100 and p.epochs > 3
    assert abs(p.seconds["total"] - 3600.0) <= 1024 / RATES.train_rows_s  # within one step of the budget
    assert p.steps == int((3600.0 - 300.0 - 100 * (140 / 50 + 200 / 400)) * 1000 // 1024)


def test_a_budget_too_small_is_refused_with_what_it_needs():
    with pytest.raises(ValueError, match="cannot fit 8 prompts.*raise --time-budget"):
        plan(
            60.0,
            RATES,
            available_prompts=1000,
            prompt_tokens=60,
            reply_tokens=140,
            batch_tokens=1024,
            fixed_s=55.0,
        )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--time-budget", "2 hours"], "is not a duration"),
        (["--time-budget", "1h", "--steps", "5"], "--time-budget or --steps"),
        (["--data-dtype", "int8"], "data dtype must be auto or one of"),
        (["--distill-check", "-1"], "distill check must be >= 0"),
    ],
)
def test_bad_budget_flags_fail_in_one_line(tmp_path, capsys, args, message):
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows(3))
    assert main(["train", "--out", str(tmp_path / "o"), "--data", str(data), *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err


def test_tiny_run_follows_its_plan_within_the_budget(tmp_path):
    """Generous: the run must not take more than 1.5x its budget; the arithmetic is tested above."""
    target, data = tiny_target_dir(tmp_path / "t"), write_jsonl(tmp_path / "d.jsonl", prompt_rows(14))
    out = tmp_path / "drafter"
    args = ["train", "--model", str(target), "--data", str(data), "--out", str(out), "--time-budget", "50s"]
    tiny = ["--held-out", "3", "--max-new-tokens", "12", "--batch-tokens", "128", "--max-param-fraction", "0"]
    tiny += ["--tau-prompts", "1", "--tau-new-tokens", "8", "--tree-nodes", "6", "--tree-depth", "3"]
    tiny += [
        "--wandb",
        "disabled",
        "--distill-batch-size",
        "4",
        "--checkpoint-every",
        "1000000",
        "--distill-check",
        "2",
    ]
    assert main([*args, *tiny]) == 0
    summary = json.loads((out / "training.json").read_text())
    planned = summary["time_budget"]
    assert planned["prompts"] == 11 and planned["limited_by"] == "data"  # 14 rows, 3 held out
    assert summary["train"]["steps"] == planned["steps"] >= 1
    # every prompt (the plan's 11 and the 3 held out); the probe's batch of 8 was distilled first
    assert summary["distill"]["cached"] == 8 and summary["distill"]["generated"] == 6
    assert summary["wall_s"] <= 1.5 * 50


def test_the_feature_cache_cap_limits_the_prompts():
    p = plan(
        3600.0,
        RATES,
        available_prompts=10_000,
        prompt_tokens=60,
        reply_tokens=140,
        batch_tokens=1024,
        fixed_s=300.0,
        max_tokens=20_000,
    )
    assert p.prompts == 100 and p.limited_by == "data"  # 20k tokens / 200 per prompt
