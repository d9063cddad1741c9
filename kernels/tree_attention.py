"""Tree attention: T draft-tree tokens attend to a cached prefix and to their own ancestors.

The target scores a whole draft tree in one forward. Query i (tree node i of sequence b) sees
every cached prefix row of b plus the tree rows of its ancestors (itself included), given as a
bit-packed ancestor mask: bit ``j % 32`` of word ``j // 32`` in row i is set iff node j is node i
or one of its ancestors. With no mask the T new tokens are plain causal (prefill, a chain).

The idea of the kernel, for a GPU that a small tree over a long prefix would leave mostly idle:

- **Group query heads.** One program takes all ``G = Hq / Hkv`` query heads of one KV head, so
  each K/V row is read once for the group. Its rows are ``(node, head)`` pairs flattened
  node-major (row ``r`` = node ``r // G``, head ``r % G``): a 16-node tree with G = 4 is one
  64-row tile; larger trees take several tiles of up to 128 rows, each reading the K/V again.
- **Split the KV axis** (flash-decoding). Each (sequence, KV head, row tile) is cut into
  ``num_splits`` chunks handled by different programs; each writes a partial (its normalized
  output and log-sum-exp) and a small combine kernel merges them. The number of splits is fixed
  from static shapes (CUDA-graph friendly); the chunk length is computed in the kernel from the
  actual ``prefix_lens[b]``, so lengths that change every step are never specialized on. With
  one split the first kernel writes the output directly and the combine is skipped.
- **Two loops.** Prefix rows need no mask beyond bounds; only the few tree rows test the bits.

Scores stay in fp32 in the log2 domain (``exp2``); P is cast to V's dtype for the second matmul
as in every flash-style kernel, and the accumulator stays fp32.
"""

from __future__ import annotations

import functools
import os

import torch
from torch.library import triton_op, wrap_triton

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # e.g. macOS: the torch reference below still works; the kernel entry points raise
    HAS_TRITON = False

# The interpreter runs every program in Python: one small config keeps tests fast, and bf16
# arithmetic is wrong there, so bf16 tiles are upcast to fp32 right after loading.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
# Splits are cut from the cache capacity; a split much shorter than this costs more in its fixed
# work (Q load, partial write, combine read) than it saves (an estimate, not a measurement).
MIN_SPLIT_ROWS = 256
# The combine kernel holds [splits, head_dim] fp32 in registers; 64 x 128 is 32 KiB per program.
MAX_SPLITS = 64
# The largest head dim whose Q tile and K/V tiles still fit in registers and shared memory.
MAX_HEAD_DIM = 256
# Row tiles: tl.dot needs >= 16 rows; up to 128 (node, head) rows share each K/V tile, so a
# 128-node tree with 4 heads per group reads its prefix 4 times rather than 8 (the usual H100 tile).
MIN_BLOCK_M, MAX_BLOCK_M = 16, 128
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


# fmt: off
if HAS_TRITON:

    def _attn_configs() -> list:
        """Tile sizes for the GPU; one small tile under the interpreter (tests)."""
        if _INTERPRET:
            return [triton.Config({"BLOCK_N": 16}, num_warps=1, num_stages=1)]
        return [
            triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bn in (32, 64, 128)
            for w in (4, 8)
            for s in (2, 3, 4)
        ]

    def _prune_attn_configs(configs, named_args, **kwargs):
        """Keep tiles that fit in shared memory and keep their warps busy, given row tile and head dim."""
        block_m, block_d = kwargs["BLOCK_M"], kwargs["BLOCK_D"]
        kept = [
            c for c in configs
            # K and V tiles (16-bit) of every pipeline stage must fit in an H100's 228 KiB of smem.
            if c.num_stages * 2 * c.kwargs["BLOCK_N"] * block_d * 2 <= 160 * 1024
            # 8 warps only pay off with a big enough score tile to share out.
            and (c.num_warps == 4 or block_m * c.kwargs["BLOCK_N"] >= 64 * 64)
        ]
        return kept or configs[:1]

    @triton.jit
    def _kv_tile(base, cols, col_ok, offs_d, d_ok, stride_s, stride_d, UPCAST: tl.constexpr):
        """Load K or V rows ``cols`` of one (sequence, head) as a [BLOCK_N, BLOCK_D] tile."""
        tile = tl.load(
            base + cols[:, None].to(tl.int64) * stride_s + offs_d[None, :] * stride_d,
            mask=col_ok[:, None] & d_ok[None, :], other=0.0,
        )
        if UPCAST:
            tile = tile.to(tl.float32)
        return tile

    @triton.jit
    def _attend_tile(acc, m_i, l_i, q, k_base, v_base, cols, col_ok, visible, offs_d, d_ok,
                     stride_ks, stride_kd, stride_vs, stride_vd, qk_scale, UPCAST: tl.constexpr):
        """Fold K/V rows ``cols`` into the running (acc, max, sum); ``visible`` masks the scores."""
        k = _kv_tile(k_base, cols, col_ok, offs_d, d_ok, stride_ks, stride_kd, UPCAST)
        # "ieee" only changes fp32 inputs (no TF32 rounding); 16-bit inputs use tensor cores anyway.
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [BLOCK_M, BLOCK_N] log2 domain
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen nothing yet (all -inf) keeps exp2(-inf) = 0 instead of NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        v = _kv_tile(v_base, cols, col_ok, offs_d, d_ok, stride_vs, stride_vd, UPCAST)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        return acc, m_new, l_i * alpha + tl.sum(p, 1)

    @triton.jit
    def _tree_visible(bits_base, node, row_ok, c, col_ok, stride_bt, stride_bw, HAS_TREE: tl.constexpr):
        """[BLOCK_M, BLOCK_N] bool: may a row of node ``node`` see tree column ``c`` (0-based)?"""
        if HAS_TREE:
            word = tl.load(
                bits_base + node[:, None] * stride_bt + (c // 32)[None, :] * stride_bw,
                mask=row_ok[:, None] & col_ok[None, :], other=0,
            )
            # `>>` is arithmetic on int32, so bit 31 reads back as -1; `& 1` makes it 1 again.
            return (((word >> (c % 32)[None, :]) & 1) != 0) & col_ok[None, :]
        else:
            return (c[None, :] <= node[:, None]) & col_ok[None, :]

    @triton.jit
    def _write_rows(acc, m_i, l_i, out_row, row_ok, offs_d, d_ok, OUT, O_PART, LSE_PART,
                    pid_split, NUM_SPLITS, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr):
        """Normalize and store: the final rows, or this split's rows and their log2-sum-exp."""
        # A row that saw nothing here (an empty split) has acc = 0 and l = 0: output 0, lse -inf.
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        mask = row_ok[:, None] & d_ok[None, :]
        if SPLIT:
            lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
            part_row = out_row * NUM_SPLITS + pid_split
            tl.store(LSE_PART + part_row, lse, mask=row_ok)
            tl.store(O_PART + part_row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=mask)
        else:
            out = o.to(OUT.dtype.element_ty)
            tl.store(OUT + out_row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask)

    @triton.autotune(
        configs=_attn_configs(),
        key=["BLOCK_M", "BLOCK_D", "HAS_TREE", "SPLIT"],
        prune_configs_by={"early_config_prune": _prune_attn_configs},
    )
    # T is not specialized either: prefill lengths vary per prompt and would compile variants.
    @triton.jit(do_not_specialize=["T"])
    def _tree_attention_kernel(
        Q, K, V, PREFIX_LENS, BITS, OUT, O_PART, LSE_PART,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_bb, stride_bt, stride_bw,
        T, S, HKV, NUM_SPLITS, qk_scale,
        GROUP: tl.constexpr,  # Hq // Hkv: fixed per model; makes row -> (node, head) a cheap division
        HEAD_DIM: tl.constexpr,  # fixed per model; masks the padding of BLOCK_D
        HAS_TREE: tl.constexpr,  # bit lookup vs causal compare: different code, fixed per call site
        SPLIT: tl.constexpr,  # write partials for the combine kernel vs the final output directly
        UPCAST: tl.constexpr,  # interpreter only: bf16 math is wrong there, so compute in fp32
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_split, pid_bh, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, hkv = pid_bh // HKV, pid_bh % HKV
        prefix = tl.load(PREFIX_LENS + b)
        # min(., S) only keeps a bad prefix_lens from reading out of bounds; it is validated on CPU.
        kv_len = tl.minimum(prefix + T, S)
        # This program's chunk of [0, kv_len): equal shares rounded up to whole tiles.
        chunk = tl.cdiv(tl.cdiv(kv_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = pid_split * chunk
        hi = tl.minimum(lo + chunk, kv_len)

        offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] rows = (node, head), node-major
        node, head = offs_r // GROUP, hkv * GROUP + offs_r % GROUP
        row_ok = offs_r < T * GROUP
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        b64 = b.to(tl.int64)
        q_rows = Q + b64 * stride_qb + head[:, None] * stride_qh + node[:, None] * stride_qt
        q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        k_base = K + b64 * stride_kb + hkv.to(tl.int64) * stride_kh
        v_base = V + b64 * stride_vb + hkv.to(tl.int64) * stride_vh

        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

        # Prefix rows: every query sees them; only the chunk end needs a mask.
        pre_hi = tl.minimum(hi, prefix)
        for start in range(lo, pre_hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < pre_hi
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, v_base, cols, col_ok, col_ok[None, :],
                                         offs_d, d_ok, stride_ks, stride_kd, stride_vs, stride_vd,
                                         qk_scale, UPCAST)

        # Tree rows: visibility from the ancestor bits (or causal). Without bits, rows of this
        # tile see no tree column past their last node, so the loop stops there (prefill).
        tree_hi = hi
        if not HAS_TREE:
            last_node = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, T - 1)
            tree_hi = tl.minimum(hi, prefix + last_node + 1)
        bits_base = BITS + b64 * stride_bb
        for start in range(tl.maximum(lo, prefix), tree_hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < tree_hi
            seen = _tree_visible(bits_base, node, row_ok, cols - prefix, col_ok, stride_bt, stride_bw,
                                 HAS_TREE)
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, v_base, cols, col_ok, seen,
                                         offs_d, d_ok, stride_ks, stride_kd, stride_vs, stride_vd,
                                         qk_scale, UPCAST)

        # Output row (b, node, head) of [B, T, Hq, D]; partial rows add the split index.
        out_row = (b64 * T + node) * (HKV * GROUP) + head  # [BLOCK_M]
        _write_rows(acc, m_i, l_i, out_row, row_ok, offs_d, d_ok, OUT, O_PART, LSE_PART,
                    pid_split, NUM_SPLITS, HEAD_DIM, SPLIT)

    @triton.jit
    def _combine_kernel(
        O_PART, LSE_PART, OUT, NUM_SPLITS,
        HEAD_DIM: tl.constexpr,  # fixed per model; masks the padding of BLOCK_D
        BLOCK_S: tl.constexpr,  # next power of two >= NUM_SPLITS (fixed by static shapes)
        BLOCK_D: tl.constexpr,
    ):
        """One output row: weight each split's normalized output by its share of the softmax mass."""
        row = tl.program_id(0).to(tl.int64)  # row of OUT viewed as [B * T * Hq, D]
        offs_s, offs_d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
        s_ok, d_ok = offs_s < NUM_SPLITS, offs_d < HEAD_DIM
        lse = tl.load(LSE_PART + row * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
        m = tl.max(lse, 0)
        w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # empty splits weigh exp2(-inf) = 0
        o = tl.load(
            O_PART + (row * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=s_ok[:, None] & d_ok[None, :], other=0.0,
        )
        total = tl.sum(w, 0)
        out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0)
        tl.store(OUT + row * HEAD_DIM + offs_d, out.to(OUT.dtype.element_ty), mask=d_ok)
# fmt: on


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 2 stands in for the CPU interpreter."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pick_num_splits(q: torch.Tensor, k: torch.Tensor, block_m: int) -> int:
    """Enough KV splits for about two waves of programs; from static shapes only (graph-safe)."""
    batch, hq, t, _ = q.shape
    programs = batch * k.shape[1] * triton.cdiv(t * (hq // k.shape[1]), block_m)
    wanted = triton.cdiv(2 * _sm_count(q.device), programs)
    return max(1, min(wanted, MAX_SPLITS, triton.cdiv(k.shape[2], MIN_SPLIT_ROWS)))


def _block_m(rows: int) -> int:
    return min(MAX_BLOCK_M, max(MIN_BLOCK_M, triton.next_power_of_2(rows)))


def _bits_args(tree_bits: torch.Tensor | None, dummy: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The bits pointer and its (batch, node, word) strides; a tree shared by all sequences has
    batch stride 0."""
    if tree_bits is None:
        return dummy, (0, 0, 0)  # never read: HAS_TREE is False
    if tree_bits.ndim == 2:
        return tree_bits, (0, *tree_bits.stride())
    return tree_bits, tuple(tree_bits.stride())


def _launch_tree_attention(q, k, v, prefix_lens, tree_bits, scale: float, num_splits: int) -> torch.Tensor:
    """Allocate the output (and partials when split), launch, combine. Inputs are already checked."""
    batch, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    group = hq // hkv
    block_m, block_d = _block_m(t * group), max(16, triton.next_power_of_2(d))
    splits = num_splits if num_splits > 0 else _pick_num_splits(q, k, block_m)
    split = splits > 1
    out = torch.empty((batch, t, hq, d), dtype=q.dtype, device=q.device)  # [B, T, Hq, D]
    # Partials only exist when split; a 1-element dummy keeps the kernel signature fixed.
    o_part = q.new_empty((batch, t, hq, splits, d) if split else (1,), dtype=torch.float32)
    lse_part = q.new_empty((batch, t, hq, splits) if split else (1,), dtype=torch.float32)
    bits, bit_strides = _bits_args(tree_bits, prefix_lens)
    grid = (splits, batch * hkv, triton.cdiv(t * group, block_m))
    wrap_triton(_tree_attention_kernel)[grid](
        q, k, v, prefix_lens, bits, out, o_part, lse_part,
        *q.stride(), *k.stride(), *v.stride(), *bit_strides,
        t, s, hkv, splits, scale * _LOG2E,
        GROUP=group, HEAD_DIM=d, HAS_TREE=tree_bits is not None, SPLIT=split,
        UPCAST=_INTERPRET and q.dtype == torch.bfloat16, BLOCK_M=block_m, BLOCK_D=block_d,
    )  # fmt: skip
    if split:
        wrap_triton(_combine_kernel)[(batch * t * hq,)](
            o_part, lse_part, out, splits,
            HEAD_DIM=d, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
        )  # fmt: skip
    return out


if HAS_TRITON:
    # A custom op so torch.compile and CUDA graphs see the kernels (triton_op traces into them).
    @triton_op("selfspec::tree_attention", mutates_args=())
    def _tree_attention_op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        prefix_lens: torch.Tensor,
        tree_bits: torch.Tensor | None,
        scale: float,
        num_splits: int,
    ) -> torch.Tensor:
        return _launch_tree_attention(q, k, v, prefix_lens, tree_bits, scale, num_splits)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        _require(x.ndim == 4, f"{name} must be 4-D ([B, H, T or S, D]), got shape {tuple(x.shape)}")
        _require(x.dtype in _DTYPES, f"{name} has dtype {x.dtype}; use float16, bfloat16 or float32")
        _require(x.dtype == q.dtype, f"{name} has dtype {x.dtype} but q has {q.dtype}; use one dtype")
        _require(x.device == q.device, f"{name} is on {x.device} but q is on {q.device}; use one device")
    batch, hq, t, d = q.shape
    _require(k.shape == v.shape, f"k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; they must match")
    _require(k.shape[0] == batch, f"k has batch {k.shape[0]} but q has {batch}")
    _require(k.shape[3] == d, f"k has head dim {k.shape[3]} but q has {d}")
    _require(0 < d <= MAX_HEAD_DIM, f"q has head dim {d}; supported are 1..{MAX_HEAD_DIM}")
    _require(t >= 1 and batch >= 1, f"q has shape {tuple(q.shape)}, with no tokens; skip the call instead")
    _require(
        k.shape[1] >= 1 and hq % k.shape[1] == 0,
        f"q has {hq} heads, not a multiple of k's {k.shape[1]} heads (GQA needs Hq % Hkv == 0)",
    )
    _require(k.shape[2] >= t, f"k holds {k.shape[2]} rows, fewer than the {t} tree tokens; grow the cache")


def _check_lengths(q: torch.Tensor, k: torch.Tensor, prefix_lens: torch.Tensor) -> None:
    batch, t = q.shape[0], q.shape[2]
    _require(
        prefix_lens.ndim == 1 and prefix_lens.shape[0] == batch,
        f"prefix_lens must have shape [{batch}] (one length per sequence), got {tuple(prefix_lens.shape)}",
    )
    _require(prefix_lens.dtype == torch.int32, f"prefix_lens has dtype {prefix_lens.dtype}; use torch.int32")
    _require(prefix_lens.is_contiguous(), "prefix_lens must be contiguous; pass prefix_lens.contiguous()")
    _require(prefix_lens.device == q.device, f"prefix_lens is on {prefix_lens.device}; move it to {q.device}")
    # Reading the lengths costs a device sync on CUDA, so the bound is only checked on CPU (tests,
    # interpreter); on GPU the kernel clamps reads to the cache and the caller owns the bound.
    if prefix_lens.device.type == "cpu" and not torch.compiler.is_compiling():
        longest = int(prefix_lens.max())
        _require(int(prefix_lens.min()) >= 0, "prefix_lens has a negative length")
        _require(
            longest + t <= k.shape[2],
            f"k holds {k.shape[2]} rows but prefix_lens.max() + T = {longest + t}; grow the cache",
        )


def _check_bits(q: torch.Tensor, tree_bits: torch.Tensor | None) -> None:
    if tree_bits is None:
        return
    batch, t = q.shape[0], q.shape[2]
    words = (t + 31) // 32
    _require(tree_bits.dtype == torch.int32, f"tree_bits has dtype {tree_bits.dtype}; use pack_tree_mask")
    _require(tree_bits.device == q.device, f"tree_bits is on {tree_bits.device}; move it to {q.device}")
    _require(
        tuple(tree_bits.shape) in ((t, words), (batch, t, words)),
        f"tree_bits has shape {tuple(tree_bits.shape)}; expected [{t}, {words}] or [{batch}, {t}, {words}] "
        f"for T = {t} tree tokens (pack_tree_mask of a [T, T] mask)",
    )


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_lens: torch.Tensor,
    tree_bits: torch.Tensor | None,
    scale: float,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of T tree tokens over their prefix and ancestors; returns [B, T, Hq, D] in q's dtype.

    q: [B, Hq, T, D] (any strides); k, v: [B, Hkv, S, D] (any strides), rows ``prefix_lens[b] ..
    prefix_lens[b] + T - 1`` holding the tree tokens' K/V; prefix_lens: int32 [B]; tree_bits: int32
    [T, W] or [B, T, W] from :func:`pack_tree_mask`, or None for causal. ``num_splits`` overrides
    the KV split count (tests, benchmarks); None picks it from the device and the static shapes.
    """
    if not HAS_TRITON:
        raise RuntimeError("tree_attention needs triton (not installed here); use tree_attention_reference")
    _check_qkv(q, k, v)
    _check_lengths(q, k, prefix_lens)
    _check_bits(q, tree_bits)
    _require(
        q.is_cuda or _INTERPRET,
        f"q is on {q.device}: run on CUDA, set TRITON_INTERPRET=1, or use tree_attention_reference",
    )
    _require(
        num_splits is None or 1 <= num_splits <= MAX_SPLITS,
        f"num_splits must be in 1..{MAX_SPLITS}, got {num_splits}",
    )
    return torch.ops.selfspec.tree_attention(q, k, v, prefix_lens, tree_bits, float(scale), num_splits or 0)


def pack_tree_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [..., T, T] ancestor mask -> int32 [..., T, ceil(T / 32)].

    Bit ``j % 32`` of word ``j // 32`` in row i is ``mask[..., i, j]``.
    """
    if mask.dtype != torch.bool or mask.ndim < 2 or mask.shape[-1] != mask.shape[-2]:
        raise ValueError(f"mask must be a bool [..., T, T] tensor, got {mask.dtype} {tuple(mask.shape)}")
    t = mask.shape[-1]
    words = (t + 31) // 32
    padded = torch.nn.functional.pad(mask, (0, words * 32 - t)).reshape(*mask.shape[:-1], words, 32)
    weights = 2 ** torch.arange(32, dtype=torch.int64, device=mask.device)
    packed = (padded.to(torch.int64) * weights).sum(-1)  # [..., T, W] in [0, 2**32)
    # Reinterpret as two's-complement int32 (bit 31 set -> negative).
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_tree_bits(bits: torch.Tensor, t: int) -> torch.Tensor:
    """int32 [..., T, W] -> bool [..., T, t]; the inverse of :func:`pack_tree_mask`."""
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    unpacked = (bits[..., None] >> shifts) & 1  # [..., T, W, 32]
    return unpacked.reshape(*bits.shape[:-1], -1)[..., :t].bool()


def tree_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_lens: torch.Tensor,
    tree_bits: torch.Tensor | None,
    scale: float,
    *,
    upcast: bool = True,
) -> torch.Tensor:
    """Plain-torch :func:`tree_attention` (same arguments, same [B, T, Hq, D] result).

    Computes in fp32 (fp64 for fp64 inputs) by default; ``upcast=False`` keeps every step in the
    input dtype, which tests use to measure the error a low-precision implementation makes by itself.
    """
    batch, hq, t, _ = q.shape
    group = hq // k.shape[1]
    compute = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    if tree_bits is None:
        tree = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    else:
        tree = unpack_tree_bits(tree_bits, t)
    tree = tree.expand(batch, t, t)
    outs = []
    for b, prefix in enumerate(prefix_lens.tolist()):
        keys = k[b, :, : prefix + t].to(compute).repeat_interleave(group, 0)  # [Hq, L, D]
        values = v[b, :, : prefix + t].to(compute).repeat_interleave(group, 0)
        visible = torch.cat([tree.new_ones(t, prefix), tree[b]], 1)  # [T, L]
        scores = (q[b].to(compute) @ keys.transpose(1, 2)) * scale  # [Hq, T, L]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        outs.append(probs @ values)  # [Hq, T, D]
    return torch.stack(outs).transpose(1, 2).contiguous().to(q.dtype)  # [B, T, Hq, D]
