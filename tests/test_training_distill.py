"""Self-distillation: the target's own replies, a resumable cache, refusal of mixed settings."""

import json

import pytest
import torch

import selfspec
from selfspec.sampling import SamplingConfig
from selfspec.training.data import Example
from selfspec.training.distillation import DistillConfig, distill, generate_batch, prompt_ids, shard_path
from tests.helpers import tiny_target_dir

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return selfspec.load_target(str(tiny_target_dir(tmp_path_factory.mktemp("target"))), device="cpu")


def examples(n=5):
    return [
        Example(id=f"s:{i}", messages=(("user", "question " + "x" * i),), response=f"answer {i}")
        for i in range(n)
    ]


def test_batched_greedy_equals_one_by_one(target):
    model, tok = target
    prompts = [prompt_ids(tok, e) for e in examples(3)]
    batched = generate_batch(model, prompts, 12, SamplingConfig(), {257}, 257)
    for p, out in zip(prompts, batched):
        ref = model.generate(
            torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=257, eos_token_id=257
        )
        assert out == ref[0, len(p) :].tolist()[: len(out)]


def test_distill_writes_the_targets_greedy_replies(target, tmp_path):
    model, tok = target
    records, report = distill(model, tok, examples(), tmp_path, DistillConfig(max_new_tokens=8, batch_size=2))
    assert [r["id"] for r in records] == [f"s:{i}" for i in range(5)]
    assert (
        report.generated == 5
        and report.cached == 0
        and report.new_tokens == sum(len(r["response_ids"]) for r in records)
    )
    r = records[0]
    ref = model.generate(
        torch.tensor([r["prompt_ids"]]), max_new_tokens=8, do_sample=False, pad_token_id=257, eos_token_id=257
    )
    assert r["response_ids"] == ref[0, len(r["prompt_ids"]) :].tolist()[: len(r["response_ids"])]
    assert json.loads((tmp_path / "distill.json").read_text())["max_new_tokens"] == 8


def test_resume_after_a_kill_skips_done_work_and_cuts_a_torn_line(target, tmp_path):
    model, tok = target
    cfg = DistillConfig(max_new_tokens=6, batch_size=2)
    straight, _ = distill(model, tok, examples(), tmp_path / "a", cfg)
    distill(model, tok, examples(2), tmp_path / "b", cfg)  # the "killed" run got 2 of 5 done...
    with open(shard_path(tmp_path / "b", 0), "a") as f:
        f.write('{"id": "s:2", "prompt_ids": [1, 2')  # ...and died while writing the third
    resumed, report = distill(model, tok, examples(), tmp_path / "b", cfg)
    assert report.cached == 2 and report.generated == 3
    assert [r["response_ids"] for r in resumed] == [r["response_ids"] for r in straight]
    lines = shard_path(tmp_path / "b", 0).read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line) for line in lines)


def test_a_cache_made_with_other_settings_is_refused(target, tmp_path):
    model, tok = target
    distill(model, tok, examples(2), tmp_path, DistillConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="max_new_tokens=4, not 5"):
        distill(model, tok, examples(2), tmp_path, DistillConfig(max_new_tokens=5))
    distill(
        model, tok, examples(3), tmp_path, DistillConfig(max_new_tokens=4, batch_size=7)
    )  # batch size is free


def test_sampled_replies_are_seeded(target, tmp_path):
    model, tok = target
    cfg = DistillConfig(max_new_tokens=10, temperature=1.0, seed=7)
    a, _ = distill(model, tok, examples(3), tmp_path / "a", cfg)
    b, _ = distill(model, tok, examples(3), tmp_path / "b", cfg)
    c, _ = distill(
        model, tok, examples(3), tmp_path / "c", DistillConfig(max_new_tokens=10, temperature=1.0, seed=8)
    )
    assert [r["response_ids"] for r in a] == [r["response_ids"] for r in b] != [r["response_ids"] for r in c]


def test_original_replies_and_long_prompts(target, tmp_path):
    model, tok = target
    ex = examples(3) + [Example(id="s:none", messages=(("user", "no reply"),))]
    limit = len(prompt_ids(tok, ex[2])) - 1  # s:2 has the longest prompt
    records, report = distill(
        model, tok, ex, tmp_path, DistillConfig(use_original=True, max_prompt_tokens=limit)
    )
    assert report.skipped_no_reply == 1 and report.skipped_long == 1
    assert tok.decode(records[0]["response_ids"]) == "answer 0<|im_end|>\n"


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
        (dict(top_p=0.0), "top_p must be in"),
    ],
)
def test_bad_distill_config(kw, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**kw)


def test_batched_distillation_equals_unbatched_greedy_in_fp32(tmp_path):
    """Padded batches of different prompt lengths give each prompt exactly its unbatched greedy
    reply in fp32, and the built-in check (which regenerates one prompt at a time) says so."""
    model, tok = selfspec.load_target(str(tiny_target_dir(tmp_path / "t")), device="cpu", dtype="float32")
    records, report = distill(
        model, tok, examples(6), tmp_path / "d", DistillConfig(max_new_tokens=10, batch_size=4, check=6)
    )
    assert report.check_prompts == 6 and report.check_identical == 6
    assert report.check_token_agreement == 1.0 and "6/6 replies identical" in report.summary()
    eos = {257}
    for r in records:
        alone = generate_batch(model, [r["prompt_ids"]], 10, SamplingConfig(), eos, 257)[0]
        assert r["response_ids"] == alone


def test_the_check_counts_a_reply_that_differs(target):
    """The check's arithmetic: a batched reply that left the unbatched one at token 2 is not
    identical, and only its first 2 tokens count as agreeing."""
    from selfspec.training.distillation import DistillReport, check_agreement
    from selfspec.training.utils import Dist

    model, tok = target
    prompt = prompt_ids(tok, examples(1)[0])
    alone = generate_batch(model, [prompt], 6, SamplingConfig(), {257}, 257)[0]
    assert len(alone) >= 3
    changed = alone[:2] + [(alone[2] + 1) % 256] + alone[3:]
    report = DistillReport()
    records = [{"prompt_ids": prompt, "response_ids": alone}, {"prompt_ids": prompt, "response_ids": changed}]
    check_agreement(model, tok, records, DistillConfig(max_new_tokens=6), report, Dist.single())
    assert report.check_prompts == 2 and report.check_identical == 1
    assert report.check_token_agreement == round((len(alone) + 2) / (2 * len(alone)), 4)


def test_data_stages_dtype():
    import types

    from selfspec.models import cpu_has_native_bf16
    from selfspec.training.pipeline import data_dtype

    model = types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)  # only these are read
    assert data_dtype("float32", model) == torch.float32 and data_dtype("bfloat16", model) == torch.bfloat16
    assert data_dtype("auto", model) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
