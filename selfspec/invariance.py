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
  and thread count tried. No torch op gives bf16 products an fp32 result on CPU, so the only
  exact way for a non-invariant shape is the one-row call itself, once per row.
- masked SDPA over a tree (see ``selfspec.hf``): handled there by attending per depth with no
  mask, each node over exactly its own keys.
Norms, rotary, activations and residuals are per-row elementwise work and are covered by the
per-node property tests (tests/test_invariance.py) rather than assumed.

Which linear shapes break the rule depends on the CPU, the library and the thread count, so it
is measured, not listed: ``variant_linear_shapes`` probes every distinct weight shape of a model
once per process (random inputs, several row counts, one-row calls as the reference) and
``RowExactLinear`` computes only those shapes one row at a time during a verify forward. It is a
``TorchFunctionMode``: the model's modules are not touched, and outside the ``with`` block
nothing changes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

PROBE_ROWS = (2, 3, 4, 8, 16, 32, 64)  # row counts a verify forward may use (tree sizes)
PROBE_OUTPUTS = 8192  # outputs compared per row count at least: a K-blocking difference flips the
# last bit of ~1 output in 1000 (measured: 2-3 of 16 rows of 576 outputs), so this finds it surely
_PROBED: dict[tuple, bool] = {}  # (N, K, bias, dtype, device type, threads) -> row-invariant


def _probe(n: int, k: int, bias: bool, dtype: torch.dtype, device: torch.device) -> bool:
    """True when ``linear`` with an [n, k] weight gives every row of a multi-row input exactly
    its one-row result, at every row count in PROBE_ROWS."""
    g = torch.Generator().manual_seed(n * 7919 + k)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    for rows in PROBE_ROWS:
        for _ in range(-(-PROBE_OUTPUTS // (rows * n))):  # ceil: one trial for a vocabulary-wide read-out
            x = torch.randn(rows, k, generator=g).to(device, dtype)
            one = torch.cat([F.linear(x[i : i + 1], w, b) for i in range(rows)])
            if not torch.equal(F.linear(x, w, b), one):
                return False
    return True


def row_invariant(n: int, k: int, bias: bool, dtype: torch.dtype, device: torch.device) -> bool:
    """Cached per process, CPU library and thread count (the kernel choice depends on them)."""
    key = (n, k, bias, dtype, device.type, torch.get_num_threads())
    if key not in _PROBED:
        with torch.inference_mode():
            _PROBED[key] = _probe(n, k, bias, dtype, device)
    return _PROBED[key]


def variant_linear_shapes(model: nn.Module) -> frozenset[tuple[int, int]]:
    """The ``(out_features, in_features)`` of the model's linear layers that are not row-invariant
    here (probed once per distinct shape; a few ms each). CUDA is not probed: verification there
    runs the Triton kernels and its GEMMs are outside this module's reach (GPU check open)."""
    out = set()
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.device.type == "cpu":
            n, k = module.weight.shape
            if not row_invariant(n, k, module.bias is not None, module.weight.dtype, module.weight.device):
                out.add((int(n), int(k)))
    return frozenset(out)


class RowExactLinear(TorchFunctionMode):
    """Inside the mode, ``F.linear`` over several rows with a weight of one of ``shapes`` is
    computed one row at a time (the one-row call is the reference, so this is exact by
    construction); every other call passes through unchanged."""

    def __init__(self, shapes: frozenset[tuple[int, int]]):
        super().__init__()
        self.shapes = shapes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and self.shapes:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if tuple(w.shape) in self.shapes and x.numel() > x.shape[-1]:
                rows = x.reshape(-1, x.shape[-1])
                out = torch.cat([F.linear(rows[i : i + 1], w, b) for i in range(rows.shape[0])])
                return out.view(*x.shape[:-1], w.shape[0])
        return func(*args, **kwargs)
