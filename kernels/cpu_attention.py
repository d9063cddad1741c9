"""Single-query attention for many queries, each reduced exactly as torch's CPU flash attention
reduces one query (bf16), so a tree of T nodes costs one pass over the prefix instead of T
library calls, with every node bitwise what one-token decoding computes.

``tree_attention`` takes the queries of T tree nodes, one layer's K/V cache, the prefix length and
each node's ancestor rows; every query attends to the prefix (read in place) and its own ancestors.
The queries of one K/V head share each block of prefix keys (converted once, then read from L1 by
all of them), so a node adds a fraction of a one-node call (``benchmarks/bench_cpu_attention.py``).
The order it reproduces is stated in ``cpu/tree_attention_bf16.c``; it was identified by probing
torch 2.13's kernel and is not assumed to hold elsewhere: callers check it bitwise against the
library on the model's own shapes at load time (``selfspec.hf``) and keep the library call where it
differs. ``available()`` is False where the CPU lacks AVX-512 or no C compiler works.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import cpu_build

SOURCE = Path(__file__).parent / "cpu" / "tree_attention_bf16.c"
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_KERNEL = cpu_build.Kernel(
    SOURCE,
    {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"},
    {
        "tree_attention": (
            [_PTR, _PTR, _PTR] + [_I64] * 3 + [_PTR, _PTR] + [_I64] * 5 + [ctypes.c_float, _PTR],
            ctypes.c_int,
        )
    },
)


def available() -> bool:
    """True when the kernel can run here (AVX-512 CPU, a working C compiler); builds it once."""
    return _KERNEL.available()


def unavailable_reason() -> str | None:
    return _KERNEL.reason


def supports(head_dim: int, dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and head_dim % 16 == 0 and head_dim <= 256


def tree_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    prefix: int,
    ancestors: torch.Tensor,
    widths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``query`` [T, Hq, D] bf16; ``key``/``value`` [Hkv, R, D] bf16 (one layer's cache, rows
    contiguous in D, the same strides); query t attends to cache rows 0..prefix-1 and then
    ``ancestors[t, :widths[t]]`` (int64 cache rows, root first). Returns [T, Hq, D] bf16."""
    if not available():
        raise RuntimeError(f"the CPU tree attention kernel is unavailable: {_KERNEL.reason}")
    t, hq, d = query.shape
    hkv = key.shape[0]
    if (
        query.dtype != torch.bfloat16
        or key.dtype != torch.bfloat16
        or value.dtype != torch.bfloat16
        or not supports(d, query.dtype)
        or hq % hkv
        or key.stride() != value.stride()
        or key.stride(-1) != 1
        or key.shape[-1] != d
        or ancestors.dtype != torch.int64
        or widths.dtype != torch.int64
        or ancestors.shape[0] != t
        or widths.shape != (t,)
    ):
        raise ValueError(
            f"tree_attention: bad arguments (query {query.dtype} {tuple(query.shape)}, key {key.dtype} "
            f"{tuple(key.shape)} strides {key.stride()}, value strides {value.stride()}, ancestors "
            f"{ancestors.dtype} {tuple(ancestors.shape)}, widths {tuple(widths.shape)})"
        )
    q = query.contiguous()
    anc = ancestors.contiguous()
    w = widths.contiguous()
    out = torch.empty(t, hq, d, dtype=torch.bfloat16)
    status = _KERNEL.lib.tree_attention(
        q.data_ptr(),
        key.data_ptr(),
        value.data_ptr(),
        key.stride(0),
        key.stride(1),
        prefix,
        anc.data_ptr(),
        w.data_ptr(),
        anc.shape[1],
        t,
        hq,
        hkv,
        d,
        float(scale),
        out.data_ptr(),
    )
    if status != 0:
        raise MemoryError("tree_attention: the kernel could not allocate its scratch memory")
    return out


def attend_all(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """One position's queries ``[1, Hq, D]`` over every row of ``key``/``value`` ``[Hkv, R, D]``
    (a one-token decoding step): ``tree_attention`` with no ancestors."""
    return tree_attention(query, key, value, key.shape[1], _NO_ROWS, _NO_WIDTH, scale)


_NO_ROWS = torch.zeros(1, 0, dtype=torch.int64)  # read-only: shared by every attend_all call
_NO_WIDTH = torch.zeros(1, dtype=torch.int64)


def cancelling_case(
    hq: int, hkv: int, d: int, length: int, scale: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random bf16 ``query [1, Hq, D]``, ``key``/``value [Hkv, length, D]`` whose attention
    outputs cancel to about 2^-8 of their terms (each value column has the softmax-weighted mean
    of the group's first head subtracted), so a different summation order shows in the bf16 output
    about once in a few hundred outputs instead of once in ~65k. Plain random inputs hide order
    differences; this is what a bitwise check of the kernel against the library should use."""
    q = (torch.randn(1, hq, d, generator=generator) * 2).bfloat16()
    k = torch.randn(hkv, length, d, generator=generator).bfloat16()
    v = torch.randn(hkv, length, d, generator=generator)
    group = hq // hkv
    for h in range(hkv):
        p = torch.softmax((k[h].float() @ q[0, h * group].float()) * scale, dim=-1)
        v[h] -= p @ v[h]
    return q, k, v.bfloat16()
