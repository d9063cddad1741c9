"""`selfspec train`: bad inputs fail in one line before any model loads; a tiny run end to end,
killed and resumed; the same command under torchrun (two CPU processes, gloo)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import selfspec
from selfspec.cli import main
from tests.helpers import loopback_works, prompt_rows, tiny_target_dir, write_jsonl

torch.set_num_threads(1)

TINY = [
    "--held-out",
    "3",
    "--max-new-tokens",
    "12",
    "--steps",
    "6",
    "--batch-tokens",
    "128",
    "--max-param-fraction",
    "0",
    "--tau-prompts",
    "1",
    "--tau-new-tokens",
    "8",
    "--checkpoint-every",
    "3",
    "--tree-nodes",
    "6",
    "--tree-depth",
    "3",
    "--wandb",
    "disabled",
    "--distill-batch-size",
    "4",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return tiny_target_dir(root / "target"), write_jsonl(root / "data.jsonl", prompt_rows(14))


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("selfspec: error: ")
    return err[0]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "no training data"),
        (["--data", "missing.jsonl"], "--data missing.jsonl: file not found"),
        (["--data", "{data}", "--steps", "0"], "steps must be a positive integer"),
        (["--data", "{data}", "--kind", "rnn"], "unknown drafter kind 'rnn'"),
        (["--data", "{data}", "--lr", "-1"], "lr must be a positive number"),
        (["--data", "{data}", "--data-format", "xml"], "unknown data format 'xml'"),
        (["--data", "{data}", "--feature-dtype", "int8"], "feature dtype must be one of"),
        (["--data", "{data}", "--temperature", "-2"], "temperature must be a finite number"),
        (["--data", "{data}", "--held-out", "0"], "held_out must be >= 1"),
        (["--data", "{data}", "--resume", "--overwrite"], "contradict"),
        (["--data", "{data}", "--model", "not a model!"], "is neither 'default'"),
        (["--data", "{data}", "--save-dtype", "int4"], "save dtype must be one of"),
    ],
)
def test_bad_inputs_fail_in_one_line(setup, tmp_path, capsys, args, message):
    _, data = setup
    args = [a.replace("{data}", str(data)) for a in args]
    assert main(["train", "--out", str(tmp_path / "o"), *args]) == 2
    assert message in one_error_line(capsys)


def test_unknown_preset_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--preset", "turbo", "--out", "x"])
    assert e.value.code == 2


def test_out_must_be_given(capsys, setup):
    assert main(["train", "--data", str(setup[1])]) == 2
    assert "--out is required" in one_error_line(capsys)


def test_train_end_to_end_then_resume_needs_a_flag(setup, tmp_path, capsys):
    target, data = setup
    out = tmp_path / "drafter"
    args = ["train", "--model", str(target), "--data", str(data), "--out", str(out), *TINY]
    assert main(args) == 0
    summary = json.loads((out / "training.json").read_text())
    assert summary["train"]["steps"] == 6 and summary["distill"]["generated"] == 14
    assert summary["calibration"]["tree"] and summary["tau_calibrated_tree"] >= 1.0
    model, _ = selfspec.load_target(str(target), device="cpu")
    drafter = selfspec.load_drafter(out, model)
    assert drafter.config.tree == summary["calibration"]["tree"]
    assert (
        selfspec.generate(
            model, torch.tensor([[256, 5, 6]]), drafter=drafter, max_new_tokens=5
        ).stats.new_tokens
        == 5
    )
    capsys.readouterr()
    assert main(args) == 2  # the work dir holds a run: a silent restart would lose it
    assert "pass --resume to continue it or --overwrite" in one_error_line(capsys)
    first = summary
    assert main([*args, "--resume", "--steps", "8"]) == 0  # continue to 8 steps; caches reused
    summary = json.loads((out / "training.json").read_text())
    assert (
        summary["train"]["steps"] == 8
        and summary["distill"]["cached"] == 14
        and summary["distill"]["generated"] == 0
    )
    # the earlier run's work is kept, not replaced by this run's cache hits
    for stage in ("distill", "features"):
        before = {k: v for k, v in first[stage].items() if k != "runs"}
        assert summary[stage]["runs"] == [before] == first[stage]["runs"], stage


def test_train_eagle3_end_to_end_and_export(setup, tmp_path):
    target, data = setup
    out = tmp_path / "drafter3"
    assert (
        main(
            [
                "train",
                "--model",
                str(target),
                "--data",
                str(data),
                "--out",
                str(out),
                "--kind",
                "eagle3",
                *TINY,
            ]
        )
        == 0
    )
    model, _ = selfspec.load_target(str(target), device="cpu")
    drafter = selfspec.load_drafter(out, model)
    assert drafter.kind == "eagle3" and drafter.config.feature_layers == [2, 1, 0]
    settings = json.loads((out.parent / "drafter3.work" / "features" / "train" / "features.json").read_text())
    assert settings["feature_layers"] == [2, 1, 0]  # the fused layers were captured for training
    assert (
        selfspec.generate(
            model, torch.tensor([[256, 5, 6]]), drafter=drafter, max_new_tokens=5
        ).stats.new_tokens
        == 5
    )
    assert (
        main(
            [
                "export",
                "--drafter",
                str(out),
                "--format",
                "eagle3",
                "--out",
                str(tmp_path / "x"),
                "--model",
                str(target),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "x" / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLMEagle3"
    ]


def test_train_block_end_to_end_and_export_refused(setup, tmp_path, capsys):
    target, data = setup
    out = tmp_path / "block"
    args = ["train", "--model", str(target), "--data", str(data), "--out", str(out), "--kind", "block"]
    assert main([*args, "--block-depths", "3", *TINY]) == 0
    model, _ = selfspec.load_target(str(target), device="cpu")
    drafter = selfspec.load_drafter(out, model)
    assert drafter.kind == "block" and drafter.block_depths == 3 and drafter.tree.max_depth <= 3
    ids = torch.tensor([[256, 5, 6]])
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(selfspec.generate(model, ids, drafter=drafter, max_new_tokens=6).sequences, ref)
    capsys.readouterr()
    export = ["export", "--drafter", str(out), "--format", "eagle3", "--out", str(tmp_path / "x")]
    assert main([*export, "--model", str(target)]) == 2
    assert "kind block" in one_error_line(capsys) and not (tmp_path / "x").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo")
@pytest.mark.skipif(
    not loopback_works(), reason="needs TCP over loopback (torchrun's rendezvous); it is down here"
)
def test_same_command_under_torchrun_two_processes(setup, tmp_path):
    target, data = setup
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29533",
        "-m",
        "selfspec",
        "train",
        "--model",
        str(target),
        "--data",
        str(data),
        "--out",
        str(out),
        *TINY,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "training.json").read_text())
    assert summary["train"]["steps"] == 6
    shards = sorted(p.name for p in (out.parent / "ddp.work" / "distill").glob("responses.rank*.jsonl"))
    assert shards == ["responses.rank0.jsonl", "responses.rank1.jsonl"]  # each rank distilled its share
    assert summary["distill"]["requested"] == 14


def test_train_help_explains_every_flag_with_preset_values():
    """Every `selfspec train` flag has help text, and each value a preset sets is shown on its flag."""
    from selfspec.cli import build_parser
    from selfspec.training.presets import PRESETS

    parser = build_parser()
    train = next(
        a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" train")
    )
    actions = {a.dest: a for a in train._actions}
    assert all(a.help for a in train._actions), [a.dest for a in train._actions if not a.help]
    for name, sections in PRESETS.items():
        for section, values in sections.items():
            for field, value in values.items():
                assert f"{name}: {value}" in actions[f"{section}__{field}"].help, (section, field)
    subprocess.run([sys.executable, "-m", "selfspec.cli", "train", "--help"], check=True, capture_output=True)
