"""Kernels against their torch references and against an independent fp64 branch oracle.

Without CUDA the Triton kernels run under TRITON_INTERPRET (see conftest.py), so shapes are tiny.
Tolerances come from the dtype: the kernel's error against the fp64 oracle may be at most twice
the error the plain-torch implementation makes when it computes in the same low precision.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selfspec.kernels.kv_commit import kv_commit, kv_commit_reference
from selfspec.kernels.tree_attention import (
    HAS_TRITON,
    pack_tree_mask,
    tree_attention,
    tree_attention_reference,
    unpack_tree_bits,
)
from selfspec.tree import tree_from_parents

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(
    not CUDA,
    reason="needs CUDA (bf16 math and torch.compile of Triton kernels do not run in the interpreter)",
)
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# fp32 kernels and torch both make ~1e-7 errors; a few ulps of slack keeps 2x from being a coin toss.
FP32_FLOOR = 1e-6


# ----------------------------------------------------------------------------- trees


def _parents(shape: str, seed: int = 0) -> list[int]:
    """Parents of a named tree shape: single, chainN, wideN (root + N children), randomN."""
    if shape == "single":
        return [-1]
    kind, n = shape.rstrip("0123456789"), int(shape.lstrip("abcdefghijklmnopqrstuvwxyz"))
    if kind == "chain":
        return [-1] + list(range(n - 1))
    if kind == "wide":
        return [-1] + [0] * n
    gen = torch.Generator().manual_seed(seed)
    return [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]


def _ancestors(parents: list[int], node: int) -> list[int]:
    """Node and its ancestors, root first."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def branch_oracle(q, k, v, prefix_lens, parents_per_seq, scale) -> torch.Tensor:
    """fp64 [B, T, Hq, D]: each node's output is plain causal attention over prefix + its own path.

    The node is the last token of that sequence, so causal attention lets it see every row.
    """
    batch, hq, t, _ = q.shape
    group = hq // k.shape[1]
    out = torch.empty(batch, t, hq, q.shape[3], dtype=torch.float64)
    for b, (prefix, parents) in enumerate(zip(prefix_lens.tolist(), parents_per_seq)):
        for node in range(t):
            rows = list(range(prefix)) + [prefix + j for j in _ancestors(parents, node)]
            keys = k[b][:, rows].double().cpu().repeat_interleave(group, 0)  # [Hq, L, D]
            values = v[b][:, rows].double().cpu().repeat_interleave(group, 0)
            query = q[b, :, node].double().cpu()  # [Hq, D]
            probs = (torch.einsum("hd,hld->hl", query, keys) * scale).softmax(-1)
            out[b, node] = torch.einsum("hl,hld->hd", probs, values)
    return out


# ----------------------------------------------------------------------------- tree attention


@dataclass(frozen=True)
class AttnCase:
    prefix: tuple[int, ...]  # one prefix length per sequence (B = len(prefix))
    tree: str  # tree shape (see _parents); "causal" passes tree_bits=None over a chain
    hq: int = 2
    hkv: int = 2
    d: int = 16
    dtype: torch.dtype = torch.float32
    splits: int | None = 1  # None lets the launcher pick
    per_seq_trees: bool = False  # [B, T, W] bits, a different random tree per sequence
    strided: bool = False  # q, k, v as non-contiguous views (q as transformers passes it)


ATTN_CASES = {
    "single node, prefix 0": AttnCase(prefix=(0,), tree="single"),
    "single node, prefix 1": AttnCase(prefix=(1,), tree="single"),
    "chain, prefix 1": AttnCase(prefix=(1,), tree="chain5"),
    "wide, GQA 2, prefix 19": AttnCase(prefix=(19,), tree="wide8", hq=4, hkv=2),
    "random, GQA 3, 3 splits": AttnCase(prefix=(37,), tree="random12", hq=6, hkv=2, d=32, splits=3),
    "random, GQA 4, 2 splits": AttnCase(prefix=(33,), tree="random10", hq=8, hkv=2, splits=2),
    "random, MQA": AttnCase(prefix=(17,), tree="random7", hq=3, hkv=1),
    "head dim 24 (padded)": AttnCase(prefix=(5,), tree="random6", d=24),
    "head dim 80 (padded)": AttnCase(prefix=(3,), tree="random5", hq=2, hkv=1, d=80),
    "batch 2, per-seq trees": AttnCase(
        prefix=(23, 4), tree="random9", hq=4, hkv=2, splits=2, per_seq_trees=True
    ),
    "batch 2, shared tree, prefix 0": AttnCase(prefix=(0, 21), tree="random9", hq=4, hkv=1, splits=3),
    "causal (None), batch 2": AttnCase(prefix=(5, 0), tree="causal6"),
    "causal (None), 2 splits, GQA 2": AttnCase(prefix=(18, 40), tree="causal20", hq=4, hkv=2, splits=2),
    "non-contiguous q, k, v": AttnCase(prefix=(11, 2), tree="random8", hq=4, hkv=2, strided=True, splits=2),
    "T > 32 (two words)": AttnCase(prefix=(9,), tree="random40", hq=2, hkv=1),
    "T > 32, splits 4": AttnCase(prefix=(50,), tree="random36", hq=2, hkv=2, splits=4),
    "two row tiles (T*G > 128)": AttnCase(prefix=(6,), tree="random40", hq=8, hkv=2, splits=2),
    "causal, two row tiles": AttnCase(prefix=(3,), tree="causal40", hq=4, hkv=1),
    "auto splits": AttnCase(prefix=(30,), tree="random7", hq=4, hkv=2, splits=None),
    "fp16 random GQA 3": AttnCase(
        prefix=(37,), tree="random12", hq=6, hkv=2, d=32, dtype=torch.float16, splits=3
    ),
    "fp16 batch 2 per-seq": AttnCase(
        prefix=(23, 4), tree="random9", hq=4, hkv=2, dtype=torch.float16, per_seq_trees=True
    ),
    "fp16 causal": AttnCase(prefix=(7,), tree="causal9", dtype=torch.float16, splits=2),
    "fp16 prefix 0 single": AttnCase(prefix=(0,), tree="single", dtype=torch.float16),
    "bf16 random GQA 4": pytest.param(
        AttnCase(prefix=(33,), tree="random10", hq=8, hkv=2, dtype=torch.bfloat16, splits=2), marks=needs_cuda
    ),
    "bf16 causal": pytest.param(
        AttnCase(prefix=(7,), tree="causal9", dtype=torch.bfloat16), marks=needs_cuda
    ),
}


def _make_attn_inputs(case: AttnCase):
    """q [B, Hq, T, D], k/v [B, Hkv, S, D] with NaN in every row past a sequence's tree, bits, parents."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    batch = len(case.prefix)
    causal = case.tree.startswith("causal")
    shape = case.tree.replace("causal", "chain")
    parents = [_parents(shape, seed=b if case.per_seq_trees else 0) for b in range(batch)]
    t, s = len(parents[0]), max(case.prefix) + len(parents[0]) + 3
    masks = torch.stack([tree_from_parents(p).ancestor_mask for p in parents])  # [B, T, T]
    bits = None if causal else pack_tree_mask(masks if case.per_seq_trees else masks[0])

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(case.dtype)

    if case.strided:  # q as [B, T, Hq, D] transposed; cache laid out [B, S, Hkv, D]
        q = randn(batch, t, case.hq, case.d).transpose(1, 2)
        k, v = (randn(batch, s, case.hkv, case.d).transpose(1, 2) for _ in range(2))
    else:  # k, v as views of one [2, B, Hkv, S, D] cache
        q = randn(batch, case.hq, t, case.d)
        k, v = randn(2, batch, case.hkv, s, case.d).unbind(0)
    for b, prefix in enumerate(case.prefix):  # rows the kernel must never read
        k[b, :, prefix + t :] = float("nan")
        v[b, :, prefix + t :] = float("nan")
    prefix_lens = torch.tensor(case.prefix, dtype=torch.int32)
    bits = None if bits is None else bits.to(DEVICE)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), prefix_lens.to(DEVICE), bits, parents


def _max_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return (x.double().cpu() - y.double().cpu()).abs().max().item()


@pytest.mark.parametrize("case", list(ATTN_CASES.values()), ids=list(ATTN_CASES))
def test_tree_attention(case: AttnCase):
    q, k, v, prefix_lens, bits, parents = _make_attn_inputs(case)
    scale = case.d**-0.5
    oracle = branch_oracle(q, k, v, prefix_lens, parents, scale)
    # How wrong torch itself is when it computes in this dtype sets the bar.
    torch_low = tree_attention_reference(q, k, v, prefix_lens, bits, scale, upcast=False)
    bound = 2 * _max_err(torch_low, oracle) + (FP32_FLOOR if case.dtype == torch.float32 else 0.0)
    reference = tree_attention_reference(q, k, v, prefix_lens, bits, scale)
    out = tree_attention(q, k, v, prefix_lens, bits, scale, num_splits=case.splits)

    assert out.shape == (len(case.prefix), q.shape[2], case.hq, case.d) and out.is_contiguous()
    assert out.dtype == case.dtype
    assert _max_err(reference, oracle) <= bound, "the torch reference disagrees with the branch oracle"
    assert _max_err(out, oracle) <= bound, f"kernel error {_max_err(out, oracle):.3g} > bound {bound:.3g}"
    assert _max_err(out, reference) <= bound


def test_tree_attention_splits_agree():
    """The split path (partials + combine) and the direct path give the same numbers."""
    case = AttnCase(prefix=(45, 12), tree="random8", hq=4, hkv=2)
    q, k, v, prefix_lens, bits, _ = _make_attn_inputs(case)
    one = tree_attention(q, k, v, prefix_lens, bits, 0.25, num_splits=1)
    many = tree_attention(q, k, v, prefix_lens, bits, 0.25, num_splits=5)
    assert _max_err(one, many) <= FP32_FLOOR


# ----------------------------------------------------------------------------- kv commit


@dataclass(frozen=True)
class CommitCase:
    prefix: tuple[int, ...]  # per sequence
    src: tuple[tuple[int, ...], ...]  # per sequence, padded to one length
    accepted: tuple[int, ...]  # per sequence
    layers: int = 3
    dtype: torch.dtype = torch.float32


COMMIT_CASES = {
    "hazard [0, 2, 3, 5]": CommitCase(prefix=(3,), src=((0, 2, 3, 5),), accepted=(4,)),
    "hazard, one layer": CommitCase(prefix=(0,), src=((0, 1, 3, 4, 6),), accepted=(5,), layers=1),
    "chain is a no-op": CommitCase(prefix=(4,), src=((0, 1, 2, 3),), accepted=(4,)),
    "batch 2, different prefixes and counts": CommitCase(
        prefix=(3, 7), src=((0, 2, 3, 5), (0, 3, 9, 9)), accepted=(4, 2)
    ),
    "nothing accepted in one sequence": CommitCase(
        prefix=(2, 5), src=((0, 4, 6), (0, 1, 2)), accepted=(3, 0)
    ),
    "root only": CommitCase(prefix=(1,), src=((0, 7, 7),), accepted=(1,)),
    "path of one (N = 1)": CommitCase(prefix=(5, 0), src=((0,), (0,)), accepted=(1, 0)),
    "fp16": CommitCase(prefix=(3, 1), src=((0, 2, 3, 5), (0, 1, 5, 6)), accepted=(4, 4), dtype=torch.float16),
    "bf16 (a copy: no bf16 math)": CommitCase(
        prefix=(2,), src=((0, 3, 4),), accepted=(3,), dtype=torch.bfloat16
    ),
}


@pytest.mark.parametrize("case", list(COMMIT_CASES.values()), ids=list(COMMIT_CASES))
def test_kv_commit(case: CommitCase):
    batch, hkv, d = len(case.prefix), 2, 16
    s = max(p + max(row) + 1 for p, row in zip(case.prefix, case.src)) + 2
    gen = torch.Generator().manual_seed(0)
    before = torch.randn(case.layers, 2, batch, hkv, s, d, generator=gen).to(case.dtype).to(DEVICE)
    args = [
        torch.tensor(case.prefix, dtype=torch.int32, device=DEVICE),
        torch.tensor(case.src, dtype=torch.int64, device=DEVICE),
        torch.tensor(case.accepted, dtype=torch.int32, device=DEVICE),
    ]
    expected, out = before.clone(), before.clone()
    kv_commit_reference(expected, *args)
    kv_commit(out, *args)

    assert torch.equal(out, expected)
    for b, (prefix, n) in enumerate(zip(case.prefix, case.accepted)):
        for i in range(n):  # the accepted rows moved into place
            assert torch.equal(out[:, :, b, :, prefix + i], before[:, :, b, :, prefix + case.src[b][i]])
        untouched = [r for r in range(s) if not prefix <= r < prefix + n]
        assert torch.equal(out[:, :, b, :, untouched], before[:, :, b, :, untouched])


# ----------------------------------------------------------------------------- validation


def _attn_args(**override):
    """Valid tree_attention arguments (B=1, Hq=4, Hkv=2, T=3, S=8, D=16) with some replaced."""
    args = {
        "q": torch.randn(1, 4, 3, 16),
        "k": torch.randn(1, 2, 8, 16),
        "v": torch.randn(1, 2, 8, 16),
        "prefix_lens": torch.tensor([2], dtype=torch.int32),
        "tree_bits": None,
        "scale": 0.25,
        **override,
    }
    return {name: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for name, x in args.items()}


ATTN_ERRORS = {
    "q float64": ({"q": torch.randn(1, 4, 3, 16, dtype=torch.float64)}, "q has dtype"),
    "k dtype differs": ({"k": torch.randn(1, 2, 8, 16, dtype=torch.float16)}, "k has dtype"),
    "heads not a multiple": ({"q": torch.randn(1, 3, 3, 16)}, "heads"),
    "k and v shapes differ": ({"v": torch.randn(1, 2, 9, 16)}, "v has"),
    "head dims differ": ({"k": torch.randn(1, 2, 8, 32), "v": torch.randn(1, 2, 8, 32)}, "head dim"),
    "S < T": ({"k": torch.randn(1, 2, 2, 16), "v": torch.randn(1, 2, 2, 16)}, "k holds 2 rows"),
    "prefix + T > S": pytest.param(
        {"prefix_lens": torch.tensor([6], dtype=torch.int32)},
        "k holds 8 rows",
        marks=pytest.mark.skipif(CUDA, reason="checked on CPU only: reading lengths on CUDA would sync"),
    ),
    "prefix_lens int64": ({"prefix_lens": torch.tensor([2])}, "prefix_lens has dtype"),
    "prefix_lens wrong shape": ({"prefix_lens": torch.tensor([2, 2], dtype=torch.int32)}, "prefix_lens must"),
    "tree_bits wrong shape": ({"tree_bits": torch.zeros(4, 1, dtype=torch.int32)}, "tree_bits has shape"),
    "tree_bits int64": ({"tree_bits": torch.zeros(3, 1, dtype=torch.int64)}, "tree_bits has dtype"),
}


@pytest.mark.parametrize(("override", "message"), list(ATTN_ERRORS.values()), ids=list(ATTN_ERRORS))
def test_tree_attention_rejects(override, message):
    with pytest.raises(ValueError, match=message):
        tree_attention(**_attn_args(**override))


def _commit_args(**override):
    """Valid kv_commit arguments (NL=2, B=1, Hkv=2, S=10, D=16, path [0, 2]) with some replaced."""
    args = {
        "kv": torch.zeros(2, 2, 1, 2, 10, 16),
        "prefix_lens": torch.tensor([2], dtype=torch.int32),
        "src": torch.tensor([[0, 2]]),
        "num_accepted": torch.tensor([2], dtype=torch.int32),
        **override,
    }
    return {name: x.to(DEVICE) for name, x in args.items()}


COMMIT_ERRORS = {
    "src int32": ({"src": torch.tensor([[0, 2]], dtype=torch.int32)}, "src has dtype"),
    "num_accepted wrong shape": (
        {"num_accepted": torch.tensor([2, 2], dtype=torch.int32)},
        "num_accepted must",
    ),
    "prefix_lens int64": ({"prefix_lens": torch.tensor([2])}, "prefix_lens has dtype"),
    "kv not contiguous": ({"kv": torch.zeros(2, 2, 1, 2, 16, 10).transpose(-1, -2)}, "kv must be contiguous"),
    "kv without K/V axis": ({"kv": torch.zeros(2, 1, 2, 10, 16)}, "kv must be"),
}


@pytest.mark.parametrize(("override", "message"), list(COMMIT_ERRORS.values()), ids=list(COMMIT_ERRORS))
def test_kv_commit_rejects(override, message):
    with pytest.raises(ValueError, match=message):
        kv_commit(**_commit_args(**override))


@pytest.mark.parametrize(
    ("module", "call"),
    [
        ("tree_attention", lambda: tree_attention(**_attn_args())),
        ("kv_commit", lambda: kv_commit(**_commit_args())),
    ],
    ids=["tree_attention", "kv_commit"],
)
def test_without_triton_entry_points_raise(module, call, monkeypatch):
    monkeypatch.setattr(importlib.import_module(f"selfspec.kernels.{module}"), "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="reference"):
        call()


# ----------------------------------------------------------------------------- bit packing


def _words_by_hand(row: list[bool]) -> list[int]:
    """The contract's layout in plain integers: bit j % 32 of word j // 32 is row[j]."""
    words = [0] * ((len(row) + 31) // 32)
    for j, seen in enumerate(row):
        words[j // 32] |= int(seen) << (j % 32)
    return words


@settings(max_examples=60, deadline=None)
@given(t=st.integers(1, 70), lead=st.sampled_from([(), (2,)]), seed=st.integers(0, 2**31 - 1))
def test_pack_tree_mask(t, lead, seed):
    mask = torch.rand(*lead, t, t, generator=torch.Generator().manual_seed(seed)) < 0.5
    bits = pack_tree_mask(mask)
    assert bits.dtype == torch.int32 and bits.shape == (*lead, t, (t + 31) // 32)
    assert torch.equal(unpack_tree_bits(bits, t), mask)
    unsigned = (bits.to(torch.int64) & 0xFFFFFFFF).reshape(-1, bits.shape[-1]).tolist()
    assert unsigned == [_words_by_hand(row) for row in mask.reshape(-1, t).tolist()]


def test_pack_tree_mask_rejects_non_square():
    with pytest.raises(ValueError, match="mask"):
        pack_tree_mask(torch.ones(3, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------- torch.compile


@needs_cuda
def test_custom_ops_compile():
    """Both ops trace under torch.compile (fullgraph) and match eager."""
    q, k, v, prefix_lens, bits, _ = _make_attn_inputs(AttnCase(prefix=(20,), tree="random8", hq=4, hkv=2))
    compiled = torch.compile(tree_attention, fullgraph=True)
    eager = tree_attention(q, k, v, prefix_lens, bits, 0.25)
    # Inductor autotunes on its own and may pick another tile, so the sum order can differ.
    assert _max_err(compiled(q, k, v, prefix_lens, bits, 0.25), eager) <= FP32_FLOOR

    args = _commit_args(src=torch.tensor([[0, 3]]))
    expected = args["kv"].clone().normal_()
    args["kv"].copy_(expected)
    kv_commit_reference(expected, args["prefix_lens"], args["src"], args["num_accepted"])
    torch.compile(kv_commit, fullgraph=True)(**args)
    assert torch.equal(args["kv"], expected)


# ----------------------------------------------------------------------------- GPU compilation without a GPU

# Compiles the real (non-interpreted) kernels to PTX for sm_90, which needs no GPU: catches type
# and layout errors the interpreter tolerates. A subprocess, since this process interprets.
_COMPILE_FOR_HOPPER = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import selfspec.kernels.kv_commit
import selfspec.kernels.tree_attention
ta, kc = sys.modules["selfspec.kernels.tree_attention"], sys.modules["selfspec.kernels.kv_commit"]

def build(fn, types, constexprs):
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
    cex = {(fn.arg_names.index(n),): v for n, v in constexprs.items()}
    target = GPUTarget("cuda", 90, 32)
    return triton.compile(ASTSource(fn, sig, cex), target=target, options={"num_warps": 4}).asm["ptx"]

variants = [  # dtype, group, head dim, has tree, split, BLOCK_M (fp32 is left out: 40 s to compile)
    ("bf16", 3, 64, True, True, 64), ("bf16", 4, 128, True, True, 128), ("fp16", 1, 80, False, False, 16),
]
for dt, group, d, has_tree, split, block_m in variants:
    types = {"Q": "*" + dt, "K": "*" + dt, "V": "*" + dt, "OUT": "*" + dt, "PREFIX_LENS": "*i32",
             "BITS": "*i32", "O_PART": "*fp32", "LSE_PART": "*fp32", "qk_scale": "fp32"}
    constexprs = {"GROUP": group, "HEAD_DIM": d, "HAS_TREE": has_tree, "SPLIT": split, "UPCAST": False,
                  "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_D": triton.next_power_of_2(d)}
    build(ta._tree_attention_kernel.fn, types, constexprs)
build(ta._combine_kernel, {"O_PART": "*fp32", "LSE_PART": "*fp32", "OUT": "*bf16"},
      {"HEAD_DIM": 128, "BLOCK_S": 64, "BLOCK_D": 128})
commit_types = {"KV": "*bf16", "PREFIX_LENS": "*i32", "SRC": "*i64", "NUM_ACCEPTED": "*i32"}
ptx = build(kc._kv_commit_kernel, commit_types, {"HEAD_DIM": 128, "BLOCK_A": 16, "BLOCK_D": 128})
assert "bar.sync" in ptx, "kv_commit lost its barrier between loads and stores"
"""


def test_kernels_compile_for_hopper():
    pytest.importorskip("triton.backends.nvidia", reason="triton without its CUDA backend")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_HOPPER],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
