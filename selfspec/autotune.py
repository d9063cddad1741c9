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
import time

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from selfspec.drafters import Drafter
from selfspec.hf import StoreCache, TreeMask, attention_backend, new_store, selfspec_attention, target_forward
from selfspec.io import atomic_write_json
from selfspec.models import cache_dir
from selfspec.tree import (
    DynamicTree,
    TreeBuffers,
    chain,
    expected_tau,
    tree_from_acceptance,
)

CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # 1 = plain decoding
VERSION = 14  # bump when the candidates, the cost model or the kernels change: older entries are re-measured
STEP_ROWS = 2  # positions a drafter catches up on per decode step (the kept path: tau ~ 2)
# A tree must be expected to beat plain decoding by this much to be chosen: each figure is a median
# of a few timings, which moved by ~10% between runs on the shared 2-core dev CPU.
MARGIN = 0.05


def budget_tau(acceptance: torch.Tensor, budget: int) -> float:
    """Expected tokens per step of the best static tree of ``budget`` nodes (bonus counted)."""
    return expected_tau(acceptance, tree_from_acceptance(acceptance, budget).paths())


def drafter_acceptance(drafter: Drafter, spec: DynamicTree) -> torch.Tensor:
    return drafter.acceptance_matrix(spec.depth, spec.top_k)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.inference_mode()
def measure(
    model: PreTrainedModel,
    drafter: Drafter,
    budgets=CANDIDATES,
    prefix: int = 256,
    repeats: int = 5,
    verify: str = "exact",
):
    """Median seconds of (draft step, verify forward) per budget, on random tokens at a ``prefix``
    context. Budgets are timed in rounds, one call each per round after a warm-up round, so drift
    and cold caches weigh on every budget alike (timing plain decoding first, cold, made trees
    look cheaper than they are)."""
    g = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (prefix,), generator=g).to(model.device)
    backend = attention_backend(model.device)
    calls = {}  # budget -> (draft step or None, verify forward)
    with selfspec_attention(model):
        for n in budgets:
            calls[n] = _budget_calls(model, drafter, ids, DynamicTree.sized(n), n, repeats, backend, verify)
        times = {n: ([], []) for n in budgets}
        bar = tqdm(
            range(repeats + 1),
            desc=f"tree=auto: timing {len(budgets)} tree sizes once on {model.device.type}",
            unit="round",
            leave=False,
            disable=None,
        )  # shown on a terminal only
        for round_ in bar:
            for n, (draft, verify_tree) in calls.items():
                d, v = (_seconds(draft) if draft else 0.0), _seconds(verify_tree)
                if round_:  # round 0 warms up
                    times[n][0].append(d)
                    times[n][1].append(v)
    return {n: (statistics.median(d), statistics.median(v)) for n, (d, v) in times.items()}


def _budget_calls(model, drafter, ids, spec, n, repeats, backend, verify):
    """The (draft, verify) calls one budget is timed with; draft is None for plain decoding."""
    prefix = ids.numel()
    cache = StoreCache(new_store(model, prefix + spec.pool_size + 1))
    first = target_forward(model, cache, ids, feature_layers=drafter.feature_layers)
    cache.store.commit(torch.arange(prefix))
    if n == 1:  # plain decoding: no draft, a one-token step
        return None, lambda: target_forward(model, cache, ids[-1:])
    # The drafter catches up on the prefix once, as after a prefill; each timed call is then a
    # decode step's proposal: a catch-up over STEP_ROWS new positions + growing the tree.
    state = drafter.begin(prefix + (repeats + 2) * (STEP_ROWS + spec.pool_size) + 1)
    d = drafter.propose(state, first.hidden, ids.roll(-1), spec)
    mask = TreeMask(d.tree.ancestor_mask, backend, verify == "exact") if d.tree.size > 1 else None
    return (
        lambda: drafter.propose(state, first.hidden[-STEP_ROWS:], ids[-STEP_ROWS:], spec),
        lambda: target_forward(model, cache, d.tokens, d.tree.depths, mask, drafter.feature_layers),
    )


def cache_key(model: PreTrainedModel, drafter: Drafter, verify: str = "exact") -> str:
    device = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu"
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    # The switches that change what a verify step costs are part of the key, as their effective
    # state (on unless "0"): a table timed with the CPU attention kernel on must not choose the
    # tree when it is off, and the reverse.
    kernels = ",".join(
        f"{k}={'off' if os.environ.get(k, '1').strip() == '0' else 'on'}"
        for k in ("SELFSPEC_CPU_ATTENTION", "SELFSPEC_CPU_KERNELS")
    )
    return (
        f"v{VERSION}|{name}|{model.dtype}|{device}|threads={torch.get_num_threads()}|{drafter.kind}|"
        f"{drafter.num_parameters_own()}|verify={verify}|{kernels}"
    )


def auto_tree(
    model: PreTrainedModel, drafter: Drafter, budgets=CANDIDATES, verify: str = "exact"
) -> DynamicTree | TreeBuffers:
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
        rates = {n: budget_tau(acc, n) / (d + v) for n, (d, v) in costs.items()}
        best = max(rates, key=rates.get)
        if 1 in rates and rates[best] < (1 + MARGIN) * rates[1]:
            best = 1  # within timing noise of plain decoding: do not draft
        table[key] = {
            "budget": best,
            "expected_tokens_per_s": rates,
            "draft_s": {n: c[0] for n, c in costs.items()},
            "verify_s": {n: c[1] for n, c in costs.items()},
        }
        atomic_write_json(path, table)
    budget = int(table[key]["budget"])
    return chain(0) if budget == 1 else DynamicTree.sized(budget)
