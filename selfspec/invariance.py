"""Row invariance: a tree node must compute, bit for bit, what a one-token decoding step computes.

Speculative decoding is lossless only if the target scores each tree node exactly as plain
decoding would score that token at that position. Mathematically a verify forward over T nodes
is T one-token steps; numerically it is one call per op over T rows, and a library may reduce
differently when it sees T rows than when it sees one. In fp32 the difference rarely shows; in
bf16 it flips greedy tokens within a few dozen tokens. The rule this module enforces: every op of
a verify forward gives each row the bits a one-row call gives it.

What breaks the rule, measured on an AMD EPYC (Zen 5, AVX512_BF16), torch 2.13 + oneDNN 3.12:
- ``linear`` in bf16 with a long reduction (the MLP down projection, K = 1536): oneDNN's brgemm
  accumulates K in blocks of 512 for one row and of 1024 for two or more rows, and adds the
  block sums in fp32, so 2-3 of every 16 rows differ from their one-row result in the last bit
  (the block sizes were identified by emulating both orders exactly in fp32). Shapes with
  K <= 1024 (q/k/v/o, gate/up, lm_head of the default model) are row-invariant at every row count
  and thread count tried. No torch op gives bf16 products an fp32 result on CPU, so a
  non-invariant shape is computed by ``selfspec.kernels.cpu_linear.blocked_linear``, a small C
  kernel that reduces every row in one fixed order (K-blocks of a given size, VDPBF16PS pair by
  pair): the block size that reproduces this library's one-row call bitwise is found by the probe
  below, at load time, on random inputs. Where the kernel cannot run (no AVX512_BF16, no C
  compiler, fp32, or no block size matches) the shape falls back to the one-row call itself,
  once per row, which is exact by construction but T times the work.
- masked SDPA over a tree (see ``selfspec.hf``): handled there by per-depth SDPA calls with no
  mask, each node over exactly its own keys (an experimental kernel doing it in one pass,
  ``selfspec.kernels.cpu_attention``, is off by default).
Norms, rotary, activations and residuals are per-row elementwise work and are covered by the
per-node property tests (tests/test_invariance.py) rather than assumed.

The same kernel is often faster than the library for the few rows of a decode step (it keeps a
packed copy of the weight and reads it once per call). ``fast_layers`` finds the row-invariant
layers it reproduces bitwise for one row and, timed at load, runs faster; ``selfspec.hf`` routes
those through it in decode steps (one token or a tree), never in a prefill, so every step keeps
the bits plain decoding with the library computes.

Which linear shapes break the rule depends on the CPU, the library and the thread count, so it
is measured, not listed: ``variant_linear_shapes`` probes every distinct weight shape of a model
once per process (random inputs, several row counts, one-row calls as the reference),
``linear_plans`` decides for each such shape between the blocked kernel (with the measured block
size) and one call per row, and ``row_exact_scope`` applies the plans during a verify forward:
forward hooks on just those linear layers enter a ``TorchFunctionMode`` (``RowExactLinear``) for the
duration of the layer's own forward. The model's modules and weights are not changed, the rest of
the forward runs without a Python mode on the stack, and outside the ``with`` block nothing is
registered.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import weakref

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from selfspec.kernels import cpu_linear

PROBE_ROWS = (2, 3, 4, 5, 7, 8, 12, 16, 24, 32, 64)  # row counts a verify forward may use (tree sizes)
PROBE_OUTPUTS = 8192  # outputs compared per row count at least: a K-blocking difference flips the
# last bit of ~1 output in 1000 (measured: 2-3 of 16 rows of 576 outputs), so this finds it surely
# K-block sizes tried for the blocked kernel, likeliest first
KERNEL_BLOCKS = (512, 256, 1024, 128, 2048, 4096)
_PROBED: dict[tuple, bool] = {}  # (N, K, bias, dtype, device type, threads) -> row-invariant
_BLOCKS: dict[tuple, int | None] = {}  # same key -> kernel block size reproducing one-row calls, or None
_TRANSPOSED: dict[tuple, bool] = {}  # same key -> (W @ x.T).T reproduces one-row calls
# Plan of a layer that is not row-invariant: TRANSPOSED (one library call with the operands'
# roles swapped), an int (the blocked kernel's K-block), or None (one library call per row).
TRANSPOSED = "transposed"
Plan = int | str | None


def _probe_weight(n: int, k: int, bias: bool, dtype: torch.dtype, device: torch.device, g: torch.Generator):
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(device, dtype)
    return w, torch.randn(n, generator=g).to(device, dtype) if bias else None


def _probe_data(n: int, k: int, bias: bool, dtype: torch.dtype, device: torch.device):
    """A random weight, bias and, per probed row count, inputs with their one-row reference outputs."""
    g = torch.Generator().manual_seed(n * 7919 + k)
    w, b = _probe_weight(n, k, bias, dtype, device, g)
    cases = []
    for rows in PROBE_ROWS:
        for _ in range(-(-PROBE_OUTPUTS // (rows * n))):  # ceil: one trial for a vocabulary-wide read-out
            x = torch.randn(rows, k, generator=g).to(device, dtype)
            cases.append((x, torch.cat([F.linear(x[i : i + 1], w, b) for i in range(rows)])))
    return w, b, cases


def _key(n: int, k: int, bias: bool, dtype: torch.dtype, device: torch.device) -> tuple:
    return (n, k, bias, dtype, device.type, torch.get_num_threads())


def row_invariant(n: int, k: int, bias: bool, dtype: torch.dtype, device: torch.device) -> bool:
    """True when ``linear`` with an [n, k] weight gives every row of a multi-row input exactly its
    one-row result, at every row count in PROBE_ROWS. Cached per process, CPU library and thread
    count (the kernel choice depends on them)."""
    key = _key(n, k, bias, dtype, device)
    if key not in _PROBED:
        with torch.inference_mode():
            w, b, cases = _probe_data(n, k, bias, dtype, device)
            _PROBED[key] = all(torch.equal(F.linear(x, w, b), one) for x, one in cases)
    return _PROBED[key]


def kernel_block(n: int, k: int, bias: bool, dtype: torch.dtype, device: torch.device) -> int | None:
    """The K-block size with which ``cpu_linear.blocked_linear`` gives every probed row bitwise the
    library's one-row result for this shape, or None (kernel unavailable, not bf16 on CPU, odd K, or
    no block size of KERNEL_BLOCKS matches). Cached like ``row_invariant``."""
    key = _key(n, k, bias, dtype, device)
    if key not in _BLOCKS:
        _BLOCKS[key] = None
        if dtype == torch.bfloat16 and device.type == "cpu" and k % 2 == 0 and cpu_linear.available():
            with torch.inference_mode():
                w, b, cases = _probe_data(n, k, bias, dtype, device)
                packed = cpu_linear.pack(w)
                for block in dict.fromkeys(min(blk, k + k % 2) for blk in KERNEL_BLOCKS):
                    if all(
                        torch.equal(cpu_linear.blocked_linear(x, packed, n, block, b), one)
                        for x, one in cases
                    ):
                        _BLOCKS[key] = block
                        break
    return _BLOCKS[key]


def transposed_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` of rows x [M, K] computed as ``(W @ x.T).T``: W is the GEMM's left operand, so the
    library blocks the reduction for W's N rows, whatever M is. Where that order equals the one-row
    call's (measured by ``transposed_matches``), every row gets its one-row bits in one call."""
    out = w @ x.T if b is None else torch.addmm(b[:, None], w, x.T)
    return out.T.contiguous()


def transposed_matches(n: int, k: int, bias: bool, dtype: torch.dtype, device: torch.device) -> bool:
    """True when ``transposed_linear`` gives every probed row bitwise the library's one-row result for
    this shape (seen on an Intel Xeon with AMX, torch 2.13, where the plain multi-row call and the
    blocked kernel do not). Cached like ``row_invariant``."""
    key = _key(n, k, bias, dtype, device)
    if key not in _TRANSPOSED:
        with torch.inference_mode():
            w, b, cases = _probe_data(n, k, bias, dtype, device)
            _TRANSPOSED[key] = all(torch.equal(transposed_linear(x, w, b), one) for x, one in cases)
    return _TRANSPOSED[key]


def plan_for(n: int, k: int, bias: bool, dtype: torch.dtype, device: torch.device) -> Plan:
    """How a layer of this shape that is not row-invariant computes several rows exactly here:
    TRANSPOSED where that single library call matches, else the blocked kernel's block size where
    one matches, else None (one call per row)."""
    if transposed_matches(n, k, bias, dtype, device):
        return TRANSPOSED
    return kernel_block(n, k, bias, dtype, device)


FAST_ROWS = (1, 4, 16)  # row counts at which the blocked kernel is timed against the library
_FAST: dict[tuple, int] = {}  # same key as _PROBED -> rows up to which the kernel is faster here


def kernel_rows(n: int, k: int, bias: bool, dtype: torch.dtype, device: torch.device) -> int:
    """For a row-invariant shape whose library one-row result the blocked kernel reproduces
    (``kernel_block``): the most rows (of ``FAST_ROWS``) up to which the kernel was timed faster
    than the library call, or 0. Measured once per process, shape and thread count (median of
    interleaved calls on the probe weight); the library may be faster on another CPU."""
    key = _key(n, k, bias, dtype, device)
    if key not in _FAST:
        _FAST[key] = 0
        block = kernel_block(n, k, bias, dtype, device)
        if block is not None:
            with torch.inference_mode():
                w, b = _probe_weight(n, k, bias, dtype, device, torch.Generator().manual_seed(n + k))
                packed = cpu_linear.pack(w)
                for rows in FAST_ROWS:
                    x = torch.randn(rows, k).to(device, dtype)
                    lib, ker = [], []
                    for _ in range(15):
                        start = time.perf_counter()
                        F.linear(x, w, b)
                        lib.append(time.perf_counter() - start)
                        start = time.perf_counter()
                        cpu_linear.blocked_linear(x, packed, n, block, b)
                        ker.append(time.perf_counter() - start)
                    if statistics.median(ker) >= statistics.median(lib):
                        break
                    _FAST[key] = rows
    return _FAST[key]


def _variant_layers(model: nn.Module):
    """The model's CPU linear layers that are not row-invariant here, with their probe arguments
    (probed once per distinct shape; a few ms each). CUDA is not probed: verification there runs
    the Triton kernels and its GEMMs are outside this module's reach (GPU check open)."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.device.type == "cpu":
            n, k = module.weight.shape
            args = (int(n), int(k), module.bias is not None, module.weight.dtype, module.weight.device)
            if not row_invariant(*args):
                yield module, args


def variant_linear_shapes(model: nn.Module) -> frozenset[tuple[int, int]]:
    """The ``(out_features, in_features)`` of the model's linear layers that are not row-invariant here."""
    return frozenset(args[:2] for _, args in _variant_layers(model))


def linear_plans(model: nn.Module) -> dict[nn.Linear, Plan]:
    """For each linear layer of ``model`` that is not row-invariant here, its ``plan_for``."""
    return {module: plan_for(*args) for module, args in _variant_layers(model)}


def fast_layers(model: nn.Module) -> dict[nn.Linear, tuple[int, int]]:
    """The row-invariant CPU linear layers of ``model`` that the blocked kernel computes bitwise as
    the library's one-row call and faster: layer -> (K-block, most rows), see ``kernel_rows``.
    A decode step (one token or a tree) may run them through the kernel and stay bitwise what
    plain decoding with the library computes."""
    out = {}
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.device.type == "cpu":
            n, k = module.weight.shape
            args = (int(n), int(k), module.bias is not None, module.weight.dtype, module.weight.device)
            if module.weight.dtype == torch.bfloat16 and row_invariant(*args):
                rows = kernel_rows(*args)
                if rows:
                    out[module] = (kernel_block(*args), rows)
    return out


_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> (weight, version, packed)


def _packed(layer: nn.Linear) -> torch.Tensor:
    """The kernel layout of the layer's weight, packed on first use and again after the weight is
    replaced or changed in place (about the weight's size in memory while the layer lives)."""
    w, entry = layer.weight, _PACKED.get(layer)
    if entry is None or entry[0] is not w or entry[1] != w._version:
        with torch.inference_mode():
            entry = _PACKED[layer] = (w, w._version, cpu_linear.pack(w))
    return entry[2]


class RowExactLinear(TorchFunctionMode):
    """Inside the mode, ``F.linear`` over several rows with the weight of one of the ``plans``'
    layers gives every row its one-row result: as one transposed call, through the blocked kernel
    with the planned block size, or one call per row where the plan is None. Every other call
    passes through unchanged."""

    def __init__(self, plans: dict[nn.Linear, Plan], fast: dict[nn.Linear, tuple[int, int]] | None = None):
        super().__init__()
        # Keyed by identity (a tensor's == is elementwise); the layers hold their weights alive.
        self._by_weight = {id(m.weight): (m.weight, block, m) for m, block in plans.items()}
        self._fast = {id(m.weight): (m.weight, block, rows, m) for m, (block, rows) in (fast or {}).items()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            fast = self._fast.get(id(w))
            if (
                fast is not None
                and fast[0] is w
                and x.dtype == torch.bfloat16
                and x.numel() <= x.shape[-1] * fast[2]
            ):
                return cpu_linear.blocked_linear(x, _packed(fast[3]), w.shape[0], fast[1], b)
            planned = self._by_weight.get(id(w))
            if planned is not None and planned[0] is w and x.numel() > x.shape[-1]:
                plan, rows = planned[1], x.reshape(-1, x.shape[-1])
                if plan == TRANSPOSED:  # in chunks of row counts the probe covered (one for most trees)
                    top = PROBE_ROWS[-1]
                    out = (
                        transposed_linear(rows, w, b)
                        if rows.shape[0] <= top
                        else torch.cat(
                            [transposed_linear(rows[i : i + top], w, b) for i in range(0, rows.shape[0], top)]
                        )
                    )
                elif plan is not None and x.dtype == torch.bfloat16:
                    return cpu_linear.blocked_linear(x, _packed(planned[2]), w.shape[0], plan, b)
                else:
                    out = torch.cat([F.linear(rows[i : i + 1], w, b) for i in range(rows.shape[0])])
                return out.view(*x.shape[:-1], w.shape[0])
        return func(*args, **kwargs)


@contextlib.contextmanager
def row_exact_scope(plans: dict[nn.Linear, Plan], fast: dict[nn.Linear, tuple[int, int]] | None = None):
    """While open, each planned linear layer computes its forward inside ``RowExactLinear`` (entered
    by a forward pre-hook, left by a forward hook), so only those layers pay for a Python mode.
    Hooks are removed, and a mode left open by an exception is closed, on the way out. With
    ``fast`` layers (``fast_layers``: most of a model's) the mode is entered once for the whole
    block instead, which costs less than hooks on every layer."""
    if fast:
        with RowExactLinear(plans, fast):
            yield
        return
    if not plans:
        yield
        return
    mode = RowExactLinear(plans)
    depth = [0]

    def enter(module, args):
        mode.__enter__()
        depth[0] += 1

    def leave(module, args, output):
        depth[0] -= 1
        mode.__exit__(None, None, None)

    handles = []
    try:
        for module in plans:
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
        yield
    finally:
        for handle in handles:
            handle.remove()
        while depth[0] > 0:
            depth[0] -= 1
            mode.__exit__(None, None, None)
