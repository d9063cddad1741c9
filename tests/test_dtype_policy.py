"""The dtype load_target picks: bf16 on CUDA and on CPUs with native bf16 dot products, fp32 on
other CPUs; an explicit dtype always wins; a bad one is refused before anything loads."""

import pytest
import torch

import selfspec
from selfspec import models


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_cpu_default_follows_native_bf16(native, expected):
    assert models.default_dtype(torch.device("cpu"), native_bf16=native) == expected


@pytest.mark.parametrize(
    "avx512_bf16, amx, expected", [(True, False, True), (False, True, True), (False, False, False)]
)
def test_native_bf16_detection_uses_torch_cpu_checks(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert models.cpu_has_native_bf16() is expected
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: expected)
    assert models.default_dtype(torch.device("cpu")) == (torch.bfloat16 if expected else torch.float32)


def test_native_bf16_detection_falls_back_to_cpu_flags(monkeypatch, tmp_path):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    flags = tmp_path / "cpuinfo"
    flags.write_text("flags : fpu avx512f avx512_bf16\n")
    real_path = models.Path
    monkeypatch.setattr(models, "Path", lambda p: flags if p == "/proc/cpuinfo" else real_path(p))
    assert models.cpu_has_native_bf16() is True
    flags.write_text("flags : fpu avx2\n")
    assert models.cpu_has_native_bf16() is False


@pytest.mark.parametrize(
    "dtype, expected",
    [("bf16", torch.bfloat16), ("float32", torch.float32), (torch.float64, torch.float64), (None, "policy")],
)
def test_load_target_dtype(tiny_checkpoint, monkeypatch, dtype, expected):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    model, _ = selfspec.load_target(str(tiny_checkpoint), dtype=dtype, device="cpu")
    assert model.dtype == (torch.bfloat16 if expected == "policy" else expected)


def test_bad_dtype_is_refused_before_loading():
    with pytest.raises(ValueError, match="dtype 'int8' is not one of"):
        selfspec.load_target("/nonexistent/dir", dtype="int8")
