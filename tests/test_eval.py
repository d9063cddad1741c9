"""``selfspec eval`` end to end on tiny random-weight models, plus its pure parts.

The fixture builds, offline, a byte-level BPE tokenizer with a chat template, a tiny Llama
target, a random Medusa drafter, a tinier assistant sharing the tokenizer, an assistant with a
different tokenizer, and a three-question MT-bench-style file (two turns each, two categories).
The end-to-end runs use float64 so greedy exactness against HF is a hard equality.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import selfspec
from selfspec.cli import EXIT_BAD_INPUT, main
from selfspec.eval import methods as M
from selfspec.eval import metrics, questions, results, runner
from selfspec.models import TINY_SIZES

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "write a poem about the sea and the sky",
    "what is two plus two and three plus three",
    "the quick brown fox jumps over the lazy dog",
]
QUESTIONS = [
    {
        "question_id": 1,
        "category": "writing",
        "turns": ["write a poem about the sea", "now one about the sky"],
    },
    {"question_id": 2, "category": "math", "turns": ["what is two plus two", "and three plus three"]},
    {"question_id": 3, "category": "writing", "turns": ["the quick brown fox", "jumps over the lazy dog"]},
]
N_NEW = 12


def make_tokenizer(corpus, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )


def save_tiny(path, tokenizer, seed, hidden=64, layers=2):
    torch.manual_seed(seed)
    config = LlamaConfig(
        **{**TINY_SIZES, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers},
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_assets")
    tok = make_tokenizer(CORPUS, 300)
    save_tiny(root / "target", tok, seed=0)
    save_tiny(root / "assistant", tok, seed=1, hidden=32, layers=1)
    save_tiny(
        root / "other", make_tokenizer(["completely different words here"], 290), seed=2, hidden=32, layers=1
    )
    target, _ = selfspec.load_target(str(root / "target"), dtype="float32", device="cpu")
    drafter = selfspec.new_drafter("medusa", target)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # random but not degenerate proposals
        for p in drafter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    drafter.save_pretrained(root / "drafter")
    (root / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return root


@pytest.fixture(autouse=True)
def wandb_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the CLI's --wandb decides


def eval_args(assets, out, *extra, methods="hf,engine", wandb="disabled"):
    return [
        "eval",
        "--model",
        str(assets / "target"),
        "--drafter",
        str(assets / "drafter"),
        "--questions",
        str(assets / "q.jsonl"),
        "--methods",
        methods,
        "--max-new-tokens",
        str(N_NEW),
        "--dtype",
        "float64",
        "--threads",
        "1",
        "--out",
        str(out),
        "--wandb",
        wandb,
        *extra,
    ]


def read_results(out):
    return json.loads((out / "results.json").read_text())


# ------------------------------------------------------------------------------------- end to end
def test_every_method_schema_plots_and_wandb_offline(assets, tmp_path):
    out = tmp_path / "out"
    argv = eval_args(
        assets,
        out,
        "--assistant",
        str(assets / "assistant"),
        "--turns",
        "all",
        "--repeats",
        "2",
        methods="hf,pld,assisted,engine,selfspec,lookup,selfspec+lookup",
        wandb="offline",
    )
    assert main(argv) == 0
    res = read_results(out)
    assert tuple(res) == results.RESULTS_FIELDS and res["complete"] and res["schema_version"] == 1
    assert len(res["records"]) == 3 * 2 * 7  # questions x turns x methods
    for r in res["records"]:
        assert tuple(r) == results.RECORD_FIELDS
        assert len(r["runs"]) == 2 and r["new_tokens"] == len(r["tokens"]) > 0
        assert r["wall_s"] > 0 and r["ttft_s"] > 0 and r["peak_mem_bytes"] > 0
        assert r["same_across_repeats"]
        # greedy, float64: every method reproduces hf exactly (the bookkeeping and the engine)
        assert r["exact_match"] is (None if r["method"] == "hf" else True) and r["mismatch"] is None
    # every repeat ran every method once, in rotated orders
    orders = {r["method"]: [run["order"] for run in r["runs"]] for r in res["records"] if r["key"] == "q:1"}
    assert sorted(o[0] for o in orders.values()) == list(range(7))
    assert set(res["summary"]) == {"hf", "pld", "assisted", "engine", "selfspec", "lookup", "selfspec+lookup"}
    for agg in res["summary"].values():
        assert tuple(agg) == results.AGGREGATE_FIELDS
    assert res["summary"]["hf"]["speedup_vs_hf"] == pytest.approx(1.0)
    assert res["summary"]["selfspec"]["accepted_by_depth"] is not None
    assert res["summary"]["selfspec"]["exact_match_rate"] == 1.0
    assert set(res["by_category"]) == {"writing", "math"}
    assert res["models"]["drafter"]["kind"] == "medusa" and res["models"]["drafter"]["param_bytes"] > 0
    env = res["environment"][0]
    assert env["torch_threads"] == 1 and env["dtype"] == "float64" and env["transformers"]
    for png in res["files"]["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "## By category" in report and "No greedy output differs from hf." in report
    run_dir = res["wandb"]["run_dir"]
    assert run_dir.startswith(os.environ["WANDB_DIR"]) and os.path.isdir(run_dir)
    assert res["wandb"]["sync_command"] == f"wandb sync {run_dir}"


def test_turns_all_feeds_the_reference_answer_back(assets, tmp_path):
    out = tmp_path / "out"
    assert main(eval_args(assets, out, "--turns", "all", "--limit", "1", methods="engine,hf")) == 0
    recs = {(r["turn"], r["method"]): r for r in read_results(out)["records"]}
    tok = PreTrainedTokenizerFast.from_pretrained(assets / "target")
    messages = questions.conversation(
        questions.Question("q:1", 1, "writing", tuple(QUESTIONS[0]["turns"]), ""), [recs[1, "hf"]["text"]]
    )
    assert recs[2, "engine"]["prompt_tokens"] == questions.encode_conversation(tok, messages, True).shape[1]
    assert not (out / "wandb").exists()  # disabled: W&B never touched


def test_sampled_runs_pass_options_through_and_are_seeded(assets, tmp_path):
    sampled = ",engine,selfspec"
    out = tmp_path / "out"
    extra = ("--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3", "--limit", "1")
    assert main(eval_args(assets, out, *extra, "--repeats", "2", methods="hf,pld" + sampled)) == 0
    res = read_results(out)
    assert all(r["exact_match"] is None for r in res["records"])  # exactness is a greedy notion
    assert all(r["same_across_repeats"] for r in res["records"])  # the seed makes repeats identical


def test_tree_and_acceptance_reach_selfspec(assets, tmp_path, monkeypatch):
    seen = []
    real = selfspec.generate

    def spy(*args, **kwargs):
        seen.append((kwargs.get("tree"), kwargs.get("acceptance"), kwargs.get("drafter") is not None))
        return real(*args, **kwargs)

    monkeypatch.setattr(selfspec, "generate", spy)
    out = tmp_path / "out"
    argv = eval_args(
        assets, out, "--tree", "5", "--acceptance", "typical", "--limit", "1", methods="hf,selfspec"
    )
    assert main(argv) == 0
    res = read_results(out)
    assert res["config"]["tree"] == 5 and res["config"]["acceptance"] == "typical"
    assert seen and all(s == (5, "typical", True) for s in seen)
    # typical acceptance at temperature 0 is greedy, and a 5-node dynamic tree is lossless
    assert all(r["exact_match"] for r in res["records"] if r["method"] == "selfspec")
    assert all(
        run["tree_nodes"] == 5 for r in res["records"] if r["method"] == "selfspec" for run in r["runs"]
    )
    assert "selfspec tree 5, typical acceptance" in (out / "report.md").read_text()


# ------------------------------------------------------------------------------------------ resume
def test_resume_after_interruption_skips_finished_questions(assets, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real, calls = runner.timed_run, []

    def flaky(ctx, name, ids, n):
        calls.append(name)
        if len(calls) == 2 + 2 + 1:  # warm-up (2 methods) + question 1 (2) + first run of question 2
            raise KeyboardInterrupt
        return real(ctx, name, ids, n)

    monkeypatch.setattr(runner, "timed_run", flaky)
    assert main(eval_args(assets, out)) == 130
    assert not (out / "results.json").exists()
    assert [json.loads(line)["key"] for line in (out / "records.jsonl").read_text().splitlines()] == ["q:1"]
    monkeypatch.setattr(runner, "timed_run", real)

    assert main(eval_args(assets, out)) == EXIT_BAD_INPUT  # no silent overwrite
    with open(out / "records.jsonl", "a") as f:
        f.write('{"key": "q:2", "records": [{"trunc')  # a torn last line from a crash mid-write
    assert main(eval_args(assets, out, "--resume")) == 0
    res = read_results(out)
    assert res["complete"] and len(res["environment"]) == 2
    sessions = {(r["key"], r["method"]): r["session"] for r in res["records"]}
    assert sessions == {
        ("q:1", "hf"): 0,
        ("q:1", "engine"): 0,
        ("q:2", "hf"): 1,
        ("q:2", "engine"): 1,
        ("q:3", "hf"): 1,
        ("q:3", "engine"): 1,
    }


def test_resume_extends_a_limited_run(assets, tmp_path):
    out = tmp_path / "out"
    assert main(eval_args(assets, out, "--limit", "2")) == 0
    assert len(read_results(out)["records"]) == 4
    assert main(eval_args(assets, out, "--resume")) == 0
    res = read_results(out)
    assert res["complete"] and len(res["records"]) == 6
    assert [r["session"] for r in res["records"]] == [0, 0, 0, 0, 1, 1]


# -------------------------------------------------------------------------------------- bad input
def _bad_inputs(assets, tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(QUESTIONS[0]) + "\n{not json\n")
    no_turns = tmp_path / "noturns.jsonl"
    no_turns.write_text(json.dumps({"question_id": 7, "category": "x"}) + "\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    used = tmp_path / "used"
    used.mkdir()
    (used / "state.json").write_text(json.dumps({"fingerprint": {"max_new_tokens": 999}, "sessions": []}))
    q = str(assets / "q.jsonl")
    return {
        "missing file": (["--questions", str(tmp_path / "nope.jsonl")], "does not exist"),
        "malformed json": (["--questions", str(bad_json)], "bad.jsonl:2: not valid JSON"),
        "missing turns": (["--questions", str(no_turns)], "noturns.jsonl:1: 'turns'"),
        "unknown method": (["--questions", q, "--methods", "hf,medusa9"], "unknown method(s) medusa9"),
        "assisted without assistant": (["--questions", q, "--methods", "hf,assisted"], "needs --assistant"),
        "limit 0": (["--questions", q, "--limit", "0"], "--limit must be a positive integer"),
        "repeats 0": (["--questions", q, "--repeats", "-1"], "--repeats must be a positive integer"),
        "out is a file": (["--questions", q, "--out", str(a_file)], "is a file"),
        "used out": (["--questions", q, "--out", str(used)], "already holds eval results"),
        "resume other settings": (["--questions", q, "--out", str(used), "--resume"], "max_new_tokens: 999"),
        "tree 0": (
            ["--questions", q, "--tree", "0"],
            "must be static, dynamic, auto or a positive node count",
        ),
        "tree word": (
            ["--questions", q, "--tree", "big"],
            "must be static, dynamic, auto or a positive node count",
        ),
        "selfspec without drafter": (
            ["--questions", q, "--methods", "selfspec", "--drafter", "none"],
            "needs a drafter",
        ),
    }


BAD = [
    "missing file",
    "malformed json",
    "missing turns",
    "unknown method",
    "assisted without assistant",
    "limit 0",
    "repeats 0",
    "out is a file",
    "used out",
    "resume other settings",
    "tree 0",
    "tree word",
    "selfspec without drafter",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_nonzero(assets, tmp_path, capsys, case):
    extra, message = _bad_inputs(assets, tmp_path)[case]
    argv = [
        "eval",
        "--model",
        str(assets / "target"),
        "--drafter",
        str(assets / "drafter"),
        "--out",
        str(tmp_path / "out"),
        "--wandb",
        "disabled",
        *extra,
    ]
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("selfspec: error:") and message in err[0], err


def test_assistant_with_another_tokenizer_is_refused(assets, tmp_path, capsys):
    argv = eval_args(assets, tmp_path / "out", "--assistant", str(assets / "other"), methods="hf,assisted")
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different tokenizer" in err[0] and "vocabulary" in err[0], err


# ------------------------------------------------------------------------------ pure parts, units
def test_sampling_kwargs_are_the_same_settings_for_hf_and_selfspec():
    s = runner.EvalConfig(questions=["q"], temperature=0.7, top_p=0.9, top_k=None, seed=5).sampling()
    assert M.hf_kwargs(s) == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0}
    assert M.selfspec_kwargs(s) == {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "seed": 5}
    assert M.vllm_request(s) == {"temperature": 0.7, "seed": 5, "top_p": 0.9, "top_k": 0}
    greedy = runner.EvalConfig(questions=["q"]).sampling()
    assert M.selfspec_kwargs(greedy) == {} and M.hf_kwargs(greedy)["do_sample"] is False


@pytest.mark.parametrize(
    "a, b, expected",
    [([1, 2, 3], [1, 2, 3], None), ([1, 2, 3], [1, 5, 3], 1), ([1, 2], [1, 2, 3], 2), ([], [4], 0)],
)
def test_first_difference(a, b, expected):
    assert M.first_difference(a, b) == expected


def test_mismatch_diagnosis_reads_the_targets_margin(assets):
    model, _ = selfspec.load_target(str(assets / "target"), dtype="float64", device="cpu")
    prompt = torch.tensor([[5, 17, 42, 9]])
    ref = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=[],
        pad_token_id=0,
    )[0, 4:].tolist()
    logits = model(torch.tensor([[5, 17, 42, 9] + ref])).logits[0]
    second = int(logits[4 + 2].topk(2).indices[1])  # the runner-up for new token 3
    other = ref[:3] + [second] + ref[4:]
    info = M.diagnose_mismatch(model, prompt, ref, other)
    top = logits[4 + 2].topk(2).values
    assert info["position"] == 3 and info["ref_token"] == ref[3] and info["token"] == second
    assert info["runner_up"] == second and info["margin"] == pytest.approx(float(top[0] - top[1]))
    assert info["gap"] == pytest.approx(info["margin"])
    assert M.diagnose_mismatch(model, prompt, ref, list(ref)) is None
    assert M.verdict(info, "float64") == ("near-tie" if info["margin"] <= 1e-8 else "suspect")
    assert M.verdict({**info, "gap": 1e-4}, "float32") == "near-tie"
    assert M.verdict({**info, "gap": 0.5}, "float32") == "suspect"
    # an exact tie in which topk lists the other method's token first (the reference's is runner-up)
    tie = {**info, "token": second + 1, "runner_up": ref[3], "margin": 0.0, "gap": 0.0}
    assert M.verdict(tie, "bfloat16") == "near-tie"


def _record(method, category, new_tokens, wall, hist, exact=None):
    return {
        "method": method,
        "category": category,
        "new_tokens": new_tokens,
        "wall_s": wall,
        "accepted_hist": hist,
        "accepted_by_depth": None,
        "ttft_s": 0.1,
        "prefill_s": None,
        "peak_mem_bytes": 10,
        "exact_match": exact,
        "mismatch": None if exact is not False else {"verdict": "near-tie"},
    }


def test_aggregates_and_speedups():
    recs = [
        _record("hf", "a", 10, 1.0, [0, 10]),
        _record("hf", "b", 30, 3.0, [0, 30]),
        _record("selfspec", "a", 10, 0.5, [0, 2, 4], exact=True),
        _record("selfspec", "b", 30, 1.0, [0, 5, 0, 5], exact=False),
    ]
    summary, by_cat = metrics.summarize(recs, ["hf", "selfspec"])
    s = summary["selfspec"]
    assert s["tokens_per_s"] == pytest.approx(40 / 1.5) and s["speedup_vs_hf"] == pytest.approx(
        (40 / 1.5) / 10
    )
    assert s["accepted_hist"] == [0, 7, 4, 5] and s["tau"] == pytest.approx((7 + 8 + 15) / 16)
    assert s["accepted_by_depth"] == pytest.approx([9 / 16, 5 / 16])
    assert s["exact_match_rate"] == 0.5 and s["mismatches"] == 1 and s["near_ties"] == 1
    assert by_cat["a"]["selfspec"]["speedup_vs_hf"] == pytest.approx(2.0)
    assert summary["hf"]["speedup_vs_engine"] is None
    assert metrics.percentile([1, 2, 3, 4], 50) == 2.5 and metrics.percentile([], 95) is None


def test_question_selection(tmp_path):
    f = tmp_path / "alpaca.jsonl"
    rows = [{"question_id": i, "category": "" if i < 3 else "x", "turns": [f"q{i}"]} for i in range(6)]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert [q.key for q in questions.load_questions([f], limit=2)] == ["alpaca:0", "alpaca:1"]
    picked = questions.load_questions([f], per_category=2)
    assert [(q.question_id, q.category) for q in picked] == [(0, "alpaca"), (1, "alpaca"), (3, "x"), (4, "x")]
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[0]) + "\n")
    with pytest.raises(
        questions.QuestionFileError, match="dup.jsonl:2: question_id 0 already used on line 1"
    ):
        questions.load_questions([dup])
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "alpaca.jsonl").write_text(f.read_text())
    with pytest.raises(questions.QuestionFileError, match="same name"):
        questions.load_questions([f, sub / "alpaca.jsonl"])


def test_schema_is_documented():
    doc = results.__doc__
    for name in results.RESULTS_FIELDS + results.RECORD_FIELDS + results.AGGREGATE_FIELDS:
        assert f'"{name}"' in doc or f"{name}" in doc, name


@pytest.mark.slow
def test_default_model_short_eval(tmp_path):
    """The real default model, greedy, two questions: engine and pld follow HF generate (any
    difference must be a float near-tie, not a wrong token)."""
    from selfspec.models import DEFAULT_NAME, cache_dir

    if not (cache_dir() / "models" / DEFAULT_NAME / "config.json").is_file():
        pytest.skip("default model not cached (set SELFSPEC_CACHE); this test does not download it")
    data = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "eval", "mt_bench.jsonl")
    if not os.path.isfile(data):
        pytest.skip("shared eval data (../shared/data/eval) not found next to the repository")
    out = tmp_path / "out"
    argv = [
        "eval",
        "--model",
        "default",
        "--drafter",
        "none",
        "--questions",
        data,
        "--methods",
        "hf,pld,engine",
        "--limit",
        "2",
        "--max-new-tokens",
        "24",
        "--threads",
        "1",
        "--out",
        str(out),
        "--wandb",
        "disabled",
    ]
    assert main(argv) == 0
    res = read_results(out)
    assert len(res["records"]) == 6
    assert all(m["verdict"] == "near-tie" for m in res["mismatches"]), res["mismatches"]


def test_grounded_set_embeds_development_passages_in_disjoint_splits(tmp_path):
    from selfspec.eval import grounded

    data = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (data / "train").is_dir():
        pytest.skip("shared development data (../shared/data/train) not found next to the repository")
    dev = grounded.build(data, "dev", 6)
    test = grounded.build(data, "test", 6)
    assert [q["category"] for q in dev] == [c for c in grounded.CATEGORIES for _ in range(6)]
    assert not {q["turns"][0] for q in dev} & {q["turns"][0] for q in test}
    eval_texts = "".join(
        (data / "eval" / f).read_text() for f in ("mt_bench.jsonl", "alpaca.jsonl", "qa.jsonl")
    )
    for q in dev + test:
        assert len(q["turns"]) == 1 and len(q["turns"][0]) > 300
        passage = q["turns"][0].split("\n\n", 1)[1][:120]
        assert passage not in eval_texts  # from the development data, never the evaluation sets
    out = tmp_path / "g.jsonl"
    assert (
        grounded.main(["--data", str(data), "--split", "test", "--per-category", "2", "--out", str(out)]) == 0
    )
    assert [json.loads(line)["question_id"] for line in out.read_text().splitlines()] == [
        f"grounded-test-{i}" for i in range(1, 9)
    ]
    assert (
        grounded.main(["--data", str(tmp_path), "--out", str(out)]) == 2
    )  # no data: one-line error, file kept
    assert len(out.read_text().splitlines()) == 8


# ------------------------------------------------------------------------------- the vllm methods
FAKE_VLLM = Path(__file__).parent / "fake_vllm"  # a stand-in `vllm` package (see its docstring)


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKE_VLLM), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_VLLM_LOG", str(tmp_path / "llm_calls.jsonl"))
    return tmp_path / "llm_calls.jsonl"


def test_vllm_methods_run_in_their_worker_beside_hf(assets, tmp_path, fake_vllm):
    import sys

    out = tmp_path / "run"
    args = eval_args(
        assets, out, "--vllm-python", sys.executable, "--vllm-k", "2", methods="hf,vllm,vllm+drafter"
    )
    assert main(args) == 0
    calls = [json.loads(line) for line in fake_vllm.read_text().splitlines()]
    assert [c["speculative_config"] is None for c in calls] == [True, False]  # one engine per method
    assert calls[0]["model"] == str(assets / "target") and calls[0]["dtype"] == "float64"
    spec = calls[1]["speculative_config"]
    assert spec["method"] == "medusa" and spec["num_speculative_tokens"] == 2  # --vllm-k wins
    exported = json.loads((Path(spec["model"]) / "selfspec_export.json").read_text())
    assert exported["format"] == "medusa" and Path(spec["model"]).parent == out
    res = read_results(out)
    by = {r["method"]: r for r in res["records"]}
    for name in ("vllm", "vllm+drafter"):
        assert by[name]["new_tokens"] == N_NEW and by[name]["exact_match"] is not None
    assert by["vllm"]["tau"] == 1.0
    # the fake keeps the first drafted token of every draft: 2 tokens per step, depth 1 always, depth 2 never
    assert by["vllm+drafter"]["tau"] == 2.0 and by["vllm+drafter"]["accepted_by_depth"] == [1.0, 0.0]
    assert by["vllm"]["tokens"] == by["vllm+drafter"]["tokens"]
    assert res["summary"]["vllm+drafter"]["accepted_by_depth"] == [1.0, 0.0]  # reported per depth too
    assert (out / "vllm.log").read_text().count("generating") >= 2  # vLLM's stdout went to the log


def test_vllm_worker_that_cannot_start_is_one_error_line(assets, tmp_path, fake_vllm, monkeypatch, capsys):
    import sys

    monkeypatch.setenv("FAKE_VLLM_FAIL", "this checkpoint has no config")
    args = eval_args(assets, tmp_path / "run", "--vllm-python", sys.executable, methods="hf,vllm")
    assert main(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        "selfspec: error: vLLM did not start: ValueError: this checkpoint has no config"
    )


def test_vllm_python_without_vllm_is_refused_before_loading(assets, tmp_path, capsys):
    args = eval_args(
        assets, tmp_path / "run", "--vllm-python", str(tmp_path / "nope" / "python"), methods="vllm"
    )
    assert main(args) == EXIT_BAD_INPUT
    assert "--vllm-python" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("drafts", "per_pos", "hist"),
    [(10, [6, 3, 1], [0, 4, 3, 2, 1]), (5, [0, 0], [0, 5, 0, 0]), (4, [4], [0, 0, 4])],
)
def test_vllm_counters_become_the_acceptance_histogram(drafts, per_pos, hist):
    from selfspec.eval.vllm import hist_from_counts

    got = hist_from_counts(drafts, per_pos)
    assert got == hist and sum(got) == drafts
    assert sum(k * n for k, n in enumerate(got)) == drafts + sum(per_pos)  # tokens = one per draft + accepted


def test_vllm_methods_on_a_gpu_machine_need_an_explicit_python(monkeypatch):
    """The venv made automatically is vLLM's CPU build; on a CUDA machine it would be the wrong one."""
    from selfspec.eval import vllm

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(vllm, "ensure_venv", lambda *a, **k: pytest.fail("must not build a CPU venv here"))
    with pytest.raises(ValueError, match="need --vllm-python on a GPU machine"):
        vllm.vllm_python(None)
