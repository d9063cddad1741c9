"""Tree calibration: measure how often the drafter's rank-k candidate at depth d is the target's
token on held-out data, then choose the static tree with the largest expected accepted length.

``acceptance[d, k]`` is the share of held-out reply positions where the target's greedy token at
depth d+1 is the drafter's rank-k candidate given the true path above it (for EAGLE: the unrolled
layer fed its own features along the true tokens; for Medusa: head d on the last state; for a
block drafter: depth row d after the true prefix).
``selfspec.tree.tree_from_acceptance`` then grows the best tree for a node budget, which is saved
in the drafter config (``config.tree``) so ``generate`` uses it by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import selfspec
from selfspec.drafters import TrainableBlock, TrainableHeads
from selfspec.training.config import CalibrationConfig
from selfspec.training.features import Sequence
from selfspec.training.objectives import Pack, TargetReadout, block_forward, shifted, unroll_no_grad
from selfspec.training.trainer import PackSchedule, collate, deployable_copy
from selfspec.tree import expected_tau, tree_from_acceptance


@dataclass
class Calibration:
    acceptance: torch.Tensor  # [D, K] float64 share of positions whose target token is at rank k
    positions: list[int]  # [D] positions measured per depth
    paths: list[list[int]]  # the chosen tree
    expected_tau: float  # 1 + sum over nodes of the product of acceptances along the path

    def summary(self) -> str:
        top1 = ", ".join(f"{a:.2f}" for a in self.acceptance[:, 0].tolist())
        return (
            f"calibration: top-1 acceptance by depth [{top1}], tree of {len(self.paths) + 1} nodes "
            f"(depth {max(map(len, self.paths), default=0)}), expected tau {self.expected_tau:.2f}"
        )


def _ranks(logits: torch.Tensor, target: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rank of ``target`` [n] among the top-k of ``logits`` [n, V]; top_k where it is not there."""
    top = logits.topk(top_k, dim=-1).indices  # [n, k]
    hit = top == target[:, None]
    return torch.where(hit.any(-1), hit.float().argmax(-1), torch.full_like(target, top_k))


@torch.no_grad()
def _eagle_ranks(drafter, readout: TargetReadout, pack: Pack, depth: int, top_k: int) -> list[torch.Tensor]:
    dtype = next(drafter.parameters()).dtype
    hidden = pack.hidden.to(dtype)
    target = readout(shifted(hidden, 1)).argmax(-1)  # [L] draft-vocab index of the target's token at t+2
    if drafter.draft_ids is not None:
        target = drafter.draft_ids[target]
    root = drafter.lift(pack.drafter_input(drafter).to(dtype))
    _, outputs = unroll_no_grad(drafter, pack, root, shifted(pack.tokens, 1), depth)
    ranks = []
    for i, out in enumerate(outputs):
        valid = (pack.pos + 1 < pack.length) & (pack.pos + 2 >= pack.prompt_len) & (pack.pos >= i)
        ranks.append(_ranks(drafter.lm_head(out[valid]).float(), target[valid], top_k))
    return ranks


@torch.no_grad()
def _medusa_ranks(drafter, pack: Pack, depth: int, top_k: int) -> list[torch.Tensor]:
    heads = drafter.depth_states(pack.hidden.to(next(drafter.parameters()).dtype))  # [L, K, H]
    ranks = []
    for k in range(depth):
        valid = (pack.pos + 2 + k < pack.length) & (pack.pos + 2 + k >= pack.prompt_len)
        ranks.append(
            _ranks(drafter.lm_head(heads[valid, k]).float(), shifted(pack.tokens, 2 + k)[valid], top_k)
        )
    return ranks


@torch.no_grad()
def _block_ranks(drafter, readout: TargetReadout, pack: Pack, depth: int, top_k: int) -> list[torch.Tensor]:
    dtype = next(drafter.parameters()).dtype
    hidden = pack.hidden.to(dtype)
    root = drafter.lift(pack.drafter_input(drafter).to(dtype))
    out = block_forward(drafter, pack, root, shifted(pack.tokens, 1))  # [block_depths, L, H]
    ranks = []
    for j in range(depth):
        target = readout(shifted(hidden, 1 + j)).argmax(-1)  # the target's token at t+2+j
        if drafter.draft_ids is not None:
            target = drafter.draft_ids[target]
        valid = (pack.pos + 1 + j < pack.length) & (pack.pos + 2 + j >= pack.prompt_len)
        ranks.append(_ranks(drafter.lm_head(out[j][valid]).float(), target[valid], top_k))
    return ranks


def measure_acceptance(
    drafter: selfspec.Drafter, model, sequences: list[Sequence], config: CalibrationConfig
) -> tuple[torch.Tensor, list[int]]:
    """``acceptance [D, K]`` and the positions measured at each depth, on held-out ``sequences``."""
    depth = config.depth
    if isinstance(drafter, TrainableHeads):
        depth = min(depth, drafter.config.num_heads)
    elif isinstance(drafter, TrainableBlock):
        depth = min(depth, drafter.block_depths)
    counts = torch.zeros(depth, config.top_k + 1, dtype=torch.float64)  # last column: not in the top-k
    readout = TargetReadout(model.get_output_embeddings(), drafter.draft_ids)
    schedule = PackSchedule(sequences, config.batch_tokens, seed=0)
    device = next(drafter.parameters()).device
    was_training = drafter.training
    drafter.eval()
    for g in range(schedule.per_epoch):
        pack = collate(sequences, schedule[g], config.batch_tokens).to(device)
        if isinstance(drafter, TrainableHeads):
            ranks = _medusa_ranks(drafter, pack, depth, config.top_k)
        elif isinstance(drafter, TrainableBlock):
            ranks = _block_ranks(drafter, readout, pack, depth, config.top_k)
        else:
            ranks = _eagle_ranks(drafter, readout, pack, depth, config.top_k)
        for d, r in enumerate(ranks):
            counts[d] += torch.bincount(r.cpu(), minlength=config.top_k + 1).double()
    drafter.train(was_training)
    positions = counts.sum(-1)
    acceptance = counts[:, : config.top_k] / positions.clamp(min=1)[:, None]
    # Non-increasing in rank (a running minimum; only noise in small samples breaks it): the tree then
    # takes rank k under a node only after ranks < k, so every rank stays below the tree size, as
    # the drafters' propose() (top-`tree size` candidates) needs.
    return acceptance.cummin(dim=-1).values, positions.long().tolist()


def calibrate(
    drafter: selfspec.Drafter, model, sequences: list[Sequence], config: CalibrationConfig
) -> Calibration:
    """Measure acceptance on ``sequences`` with the drafter as it will be deployed (saved, reloaded
    in the target's dtype) and install the best static tree in ``drafter``."""
    with torch.random.fork_rng(devices=[]):
        deployed = deployable_copy(drafter, model)
    acceptance, positions = measure_acceptance(deployed, model, sequences, config)
    if min(positions) == 0:
        raise ValueError(
            f"held-out data has no reply position at some depth (positions {positions}); "
            "hold out more or longer examples"
        )
    paths = [list(p) for p in tree_from_acceptance(acceptance, config.tree_nodes).paths()]
    drafter.config.tree = paths
    drafter.config.acceptance = [
        [round(float(a), 6) for a in row] for row in acceptance.tolist()
    ]  # tree="auto" reads it
    return Calibration(acceptance, positions, paths, expected_tau(acceptance, paths))
