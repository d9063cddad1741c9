"""``tree="auto"``: the tree budget that maximizes expected tokens per second on this device.

A bigger tree accepts more tokens per step but costs more to draft and verify, and where the
balance lies depends on the hardware (a GPU verifies 64 nodes for about the price of one; a CPU
does not) and on the verification mode (exact verification pays a single-query attention per
node on a CPU). For each candidate budget N we measure, once per model/drafter/device/dtype/
mode, the time of a verify forward over N nodes and of one decode step's drafting (a catch-up
over STEP_ROWS positions plus growing the tree), and take the expected accepted
length from the drafter's measured acceptance (``config.acceptance`` [depth, top_k], written by
calibration; a prior when the drafter was never calibrated):

    tokens/s(N) ~ tau(N) / (draft_s(N) + verify_s(N)),   tau(N) = 1 + sum of the N-1 best path
                                                          acceptance products (best-first tree)

Budget 1 is plain decoding (no drafting: tau = 1, cost = one decode step), so "auto" never
picks a tree that is expected to be slower than not speculating at all: on a small CPU, where a
verify over a dozen nodes costs about twice a decode step, it may pick exactly that. Candidate
trees are ``DynamicTree.sized(N)``: they draft no deeper or wider than N nodes can keep.

The choice is cached in ``$SELFSPEC_CACHE/autotune.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from selfspec.drafters import Drafter
from selfspec.hf import StoreCache, TreeMask, attention_backend, new_store, selfspec_attention, target_forward
from selfspec.models import cache_dir
from selfspec.tree import DynamicTree, TreeBuffers, chain, prior_acceptance, tree_from_acceptance

CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # 1 = plain decoding
VERSION = 5  # bump when the candidates or the cost model change: older cache entries are re-measured
STEP_ROWS = 2  # positions a drafter catches up on per decode step (the kept path: tau ~ 2)


def expected_tau(acceptance: torch.Tensor, budget: int) -> float:
    """Expected tokens per step of the best static tree of ``budget`` nodes (bonus counted)."""
    tree = tree_from_acceptance(acceptance, budget)
    total = 1.0
    for path in tree.paths():
        p = 1.0
        for d, k in enumerate(path):
            p *= float(acceptance[d, k])
        total += p
    return total


def drafter_acceptance(drafter: Drafter, spec: DynamicTree) -> torch.Tensor:
    measured = getattr(drafter.config, "acceptance", None)
    if measured:
        return torch.tensor(measured, dtype=torch.float64)
    return prior_acceptance(spec.depth, spec.top_k, first=0.6, decay=0.8)


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def measure(model: PreTrainedModel, drafter: Drafter, budgets=CANDIDATES, prefix: int = 256, repeats: int = 5,
            verify: str = "exact"):
    """Seconds of (draft step, verify forward) per budget, on random tokens at a ``prefix`` context."""
    g = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (prefix,), generator=g).to(model.device)
    backend = attention_backend(model.device)
    out = {}
    bar = tqdm(budgets, desc=f"tree=auto: timing {len(budgets)} tree sizes once on {model.device.type}", unit="size",
               leave=False, disable=None)  # shown on a terminal only
    with selfspec_attention(model):
        for n in bar:
            spec = DynamicTree.sized(n)
            cache = StoreCache(new_store(model, prefix + spec.pool_size + 1))
            first = target_forward(model, cache, ids, layers=drafter.feature_layers)
            cache.store.commit(torch.arange(prefix))
            if n == 1:  # plain decoding: no draft, a one-token step
                out[n] = (0.0, _median_s(lambda c=cache: target_forward(model, c, ids[-1:]), repeats))
                continue

            # The drafter catches up on the prefix once, as after a prefill; each timed call is
            # then a decode step's proposal: a catch-up over STEP_ROWS new positions + the tree.
            state = drafter.begin(prefix + (repeats + 2) * (STEP_ROWS + spec.pool_size) + 1)
            tree_draft = drafter.propose(state, first.hidden, ids.roll(-1), spec)

            def draft(first=first, spec=spec, state=state):
                return drafter.propose(state, first.hidden[-STEP_ROWS:], ids[-STEP_ROWS:], spec)

            mask = TreeMask(tree_draft.tree.ancestor_mask, backend, verify == "exact") if tree_draft.tree.size > 1 else None

            def verify_tree(cache=cache, d=tree_draft, mask=mask):
                target_forward(model, cache, d.tokens, d.tree.depths, mask, drafter.feature_layers)

            out[n] = (_median_s(draft, repeats), _median_s(verify_tree, repeats))
    return out


def cache_key(model: PreTrainedModel, drafter: Drafter, verify: str = "exact") -> str:
    device = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu"
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    return (f"v{VERSION}|{name}|{model.dtype}|{device}|threads={torch.get_num_threads()}|{drafter.kind}|"
            f"{drafter.num_parameters_own()}|verify={verify}")


def auto_tree(model: PreTrainedModel, drafter: Drafter, budgets=CANDIDATES, verify: str = "exact") -> DynamicTree | TreeBuffers:
    """The dynamic tree whose budget maximizes expected tokens/s here (measured once, cached);
    the root-only tree (plain decoding) when no tree is expected to beat it."""
    path = cache_dir() / "autotune.json"
    table = json.loads(path.read_text()) if path.is_file() else {}
    key = cache_key(model, drafter, verify)
    if key not in table:
        if any(int(n) < 1 for n in budgets):
            raise ValueError(f"tree budgets must be >= 1 node, got {tuple(budgets)}")
        acc = drafter_acceptance(drafter, DynamicTree())
        costs = measure(model, drafter, budgets, verify=verify)
        rates = {n: expected_tau(acc, n) / (d + v) for n, (d, v) in costs.items()}
        best = max(rates, key=rates.get)
        table[key] = {"budget": best, "expected_tokens_per_s": rates,
                      "draft_s": {n: c[0] for n, c in costs.items()}, "verify_s": {n: c[1] for n, c in costs.items()}}
        _write_json(path, table)
    budget = int(table[key]["budget"])
    return chain(0) if budget == 1 else DynamicTree.sized(budget)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
