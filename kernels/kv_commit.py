"""KV commit: after verification, move the accepted path's K/V rows to the front of the tree slot.

The target wrote K/V for all T tree nodes at rows ``prefix .. prefix + T - 1``. Only the accepted
path survives: its i-th node (tree index ``src[b, i]``) must end up at row ``prefix + i``, for
every layer, for K and V. The whole cache ``[NL, 2, B, Hkv, S, D]`` is done in one launch with
one program per (layer, K/V, sequence, head), each moving at most N rows of D values.

In-place safety. A destination row can be another element's source row (src = [0, 2, 3, 5]:
element 2 reads row 3 while element 3 writes row 3). Each program therefore loads *all* its
source rows into registers, passes a block barrier, and only then stores: no store of a program
can precede any load of that program. Programs never share rows (each owns one (layer, K/V,
sequence, head) slice), so there is no hazard between programs either. Elements with
``src[b, i] == i`` (the whole path of a chain tree) are already in place and are skipped.
"""

from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from .tree_attention import _INTERPRET, HAS_TRITON, _require

if HAS_TRITON:
    import triton
    import triton.language as tl

# A program holds [BLOCK_A, BLOCK_D] values in registers; 64 x 256 fp32 is 64 KiB, the most we allow.
MAX_PATH = 64
MAX_HEAD_DIM = 256


# fmt: off
if HAS_TRITON:

    @triton.jit
    def _kv_commit_kernel(
        KV, PREFIX_LENS, SRC, NUM_ACCEPTED,
        stride_l, stride_c, stride_b, stride_h, stride_s, stride_d,
        stride_src_b, stride_src_i,
        B, HKV, S,
        HEAD_DIM: tl.constexpr,  # fixed per model; masks the padding of BLOCK_D
        BLOCK_A: tl.constexpr,  # next power of two >= N (the padded path length, a static shape)
        BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)  # over (layer, K/V, sequence, head), head fastest
        h, b = pid % HKV, (pid // HKV) % B
        lc = (pid // (HKV * B)).to(tl.int64)  # layer * 2 + (0 for K, 1 for V)
        base = KV + (lc // 2) * stride_l + (lc % 2) * stride_c
        base += b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
        prefix = tl.load(PREFIX_LENS + b).to(tl.int64)
        accepted = tl.load(NUM_ACCEPTED + b)

        offs_a, offs_d = tl.arange(0, BLOCK_A), tl.arange(0, BLOCK_D)
        a_ok = offs_a < accepted
        src = tl.load(SRC + b.to(tl.int64) * stride_src_b + offs_a * stride_src_i, mask=a_ok, other=0)
        src_row, dst_row = prefix + src, prefix + offs_a
        # Rows already in place need no copy; rows past the cache (bad input) are never touched.
        move = a_ok & (src != offs_a) & (src_row < S) & (dst_row < S)
        mask = move[:, None] & (offs_d < HEAD_DIM)[None, :]
        rows = tl.load(base + src_row[:, None] * stride_s + offs_d[None, :] * stride_d, mask=mask)
        # Every load of this program completes before any store: a destination may be a source.
        tl.debug_barrier()
        tl.store(base + dst_row[:, None] * stride_s + offs_d[None, :] * stride_d, rows, mask=mask)
# fmt: on


def _launch_kv_commit(kv, prefix_lens, src, num_accepted) -> None:
    """One program per (layer, K/V, sequence, head). Shapes are already checked."""
    layers, _, batch, hkv, s, d = kv.shape
    grid = (layers * 2 * batch * hkv,)
    wrap_triton(_kv_commit_kernel)[grid](
        kv, prefix_lens, src, num_accepted,
        *kv.stride(), *src.stride(),
        batch, hkv, s,
        HEAD_DIM=d,
        BLOCK_A=triton.next_power_of_2(src.shape[1]),
        BLOCK_D=triton.next_power_of_2(d),
        num_warps=1 if _INTERPRET else 4,
    )  # fmt: skip


if HAS_TRITON:
    # A custom op that mutates kv, so torch.compile and CUDA graphs order it correctly.
    @triton_op("selfspec::kv_commit", mutates_args={"kv"})
    def _kv_commit_op(
        kv: torch.Tensor, prefix_lens: torch.Tensor, src: torch.Tensor, num_accepted: torch.Tensor
    ) -> None:
        _launch_kv_commit(kv, prefix_lens, src, num_accepted)


def _check_commit(
    kv: torch.Tensor, prefix_lens: torch.Tensor, src: torch.Tensor, num_accepted: torch.Tensor
) -> None:
    _require(kv.ndim == 6 and kv.shape[1] == 2, f"kv must be [NL, 2, B, Hkv, S, D], got {tuple(kv.shape)}")
    _require(kv.is_contiguous(), "kv must be contiguous (the preallocated cache itself, not a view of it)")
    _require(
        0 < kv.shape[5] <= MAX_HEAD_DIM, f"kv has head dim {kv.shape[5]}; supported are 1..{MAX_HEAD_DIM}"
    )
    batch = kv.shape[2]
    for name, x in (("prefix_lens", prefix_lens), ("num_accepted", num_accepted)):
        _require(x.dtype == torch.int32, f"{name} has dtype {x.dtype}; use torch.int32")
        _require(x.is_contiguous(), f"{name} must be contiguous; pass {name}.contiguous()")
        _require(tuple(x.shape) == (batch,), f"{name} must have shape [{batch}], got {tuple(x.shape)}")
    _require(src.dtype == torch.int64, f"src has dtype {src.dtype}; use torch.int64")
    _require(
        src.ndim == 2 and src.shape[0] == batch and 1 <= src.shape[1] <= MAX_PATH,
        f"src must be [{batch}, N] with 1 <= N <= {MAX_PATH}, got shape {tuple(src.shape)}",
    )
    for name, x in (("prefix_lens", prefix_lens), ("src", src), ("num_accepted", num_accepted)):
        _require(x.device == kv.device, f"{name} is on {x.device}; move it to kv's device {kv.device}")


def kv_commit(
    kv: torch.Tensor, prefix_lens: torch.Tensor, src: torch.Tensor, num_accepted: torch.Tensor
) -> None:
    """In place, for every layer, K and V, sequence b and i < num_accepted[b]:
    ``kv[:, :, b, :, prefix_lens[b] + i] = kv[:, :, b, :, prefix_lens[b] + src[b, i]]``.

    kv: [NL, 2, B, Hkv, S, D] contiguous; prefix_lens, num_accepted: int32 [B]; src: int64 [B, N],
    increasing tree node indices with ``src[b, i] >= i``, padded arbitrarily past num_accepted[b].
    """
    if not HAS_TRITON:
        raise RuntimeError("kv_commit needs triton (not installed here); use kv_commit_reference")
    _check_commit(kv, prefix_lens, src, num_accepted)
    _require(
        kv.is_cuda or _INTERPRET,
        f"kv is on {kv.device}: run on CUDA, set TRITON_INTERPRET=1, or use kv_commit_reference",
    )
    torch.ops.selfspec.kv_commit(kv, prefix_lens, src, num_accepted)


def kv_commit_reference(
    kv: torch.Tensor, prefix_lens: torch.Tensor, src: torch.Tensor, num_accepted: torch.Tensor
) -> None:
    """Plain-torch :func:`kv_commit` (same arguments, in place)."""
    for b, (prefix, n) in enumerate(zip(prefix_lens.tolist(), num_accepted.tolist())):
        rows = prefix + src[b, :n]
        # Advanced indexing gathers a copy first, so overlapping source and destination rows are safe.
        kv[:, :, b, :, prefix : prefix + n] = kv[:, :, b, :, rows]
