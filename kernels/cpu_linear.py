"""A CPU linear whose every row is reduced in one fixed order, whatever the number of rows.

Why: a library GEMM (oneDNN here) may block the reduction over K differently for one row than for
several, so a tree verify forward over T rows can differ in the last bit from the one-token steps
plain decoding makes (see ``selfspec.invariance``). ``blocked_linear`` computes ``x @ w.T`` in bf16
with VDPBF16PS, each output the left-to-right fp32 sum of K-blocks of ``block`` elements, each
block accumulated from zero pair by pair (``cpu/blocked_linear_bf16.c`` states the order exactly).
With the block size a library uses for one row, every row of a many-row call is bitwise that
library's one-row result; the caller measures which block size that is (it is not assumed here).

The C source has no torch headers: ``cpu_build`` compiles it once with the system C compiler into
``$SELFSPEC_CACHE/kernels`` and it is called through ctypes. ``available()`` is False, with the
reason in ``unavailable_reason()``, where the CPU lacks AVX512_BF16 or no compiler works; callers
then fall back to one library call per row.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import cpu_build

SOURCE = Path(__file__).parent / "cpu" / "blocked_linear_bf16.c"
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_KERNEL = cpu_build.Kernel(
    SOURCE,
    {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"},
    {
        "packed_elements": ([_I64, _I64], _I64),
        "pack_weight": ([_PTR, _PTR, _I64, _I64], None),
        "blocked_linear": ([_PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64], None),
    },
)


def available() -> bool:
    """True when the kernel can run here (AVX512_BF16 CPU, a working C compiler); builds it once."""
    return _KERNEL.available()


def unavailable_reason() -> str | None:
    """Why ``available()`` is False (None when it is True or was not asked yet)."""
    return _KERNEL.reason


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [N, K] bf16 (K even) in the kernel's layout: a flat bf16 tensor (about the
    weight's size, outputs padded to a multiple of 64)."""
    if not available():
        raise RuntimeError(f"the blocked CPU linear is unavailable: {_KERNEL.reason}")
    if (
        weight.dtype != torch.bfloat16
        or weight.dim() != 2
        or weight.shape[1] % 2
        or weight.device.type != "cpu"
    ):
        raise ValueError(
            f"pack takes a 2-D bf16 CPU weight with an even K, got {weight.dtype} {tuple(weight.shape)} "
            f"on {weight.device}"
        )
    w = weight.detach().contiguous()
    n, k = w.shape
    out = torch.empty(_KERNEL.lib.packed_elements(n, k), dtype=torch.bfloat16)
    _KERNEL.lib.pack_weight(w.data_ptr(), out.data_ptr(), n, k)
    return out


def blocked_linear(
    x: torch.Tensor, packed: torch.Tensor, n: int, block: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ w.T + bias`` for ``x`` [..., K] bf16 and ``packed = pack(w)`` with ``w`` [n, K]; K-blocks
    of ``block`` elements (even), each row in the same order; returns [..., n] bf16."""
    k = x.shape[-1]
    if (
        x.dtype != torch.bfloat16
        or block <= 0
        or block % 2
        or packed.numel() != _KERNEL.lib.packed_elements(n, k)
    ):
        raise ValueError(
            f"blocked_linear: x must be bf16 with the packed weight's K and block even and positive "
            f"(x {x.dtype} {tuple(x.shape)}, n={n}, block={block})"
        )
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if bias is not None:
        bias = bias.detach().to(torch.bfloat16).contiguous()
    y = torch.empty(rows.shape[0], n, dtype=torch.bfloat16)
    _KERNEL.lib.blocked_linear(
        rows.data_ptr(),
        rows.stride(0),
        packed.data_ptr(),
        bias.data_ptr() if bias is not None else None,
        y.data_ptr(),
        rows.shape[0],
        n,
        k,
        block,
    )
    return y.view(*x.shape[:-1], n)
