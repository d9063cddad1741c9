"""Attention math for tree verification, torch only (no transformers): the tree mask and what
is derived from it, causal masks for new tokens after a cached prefix (optionally windowed), and
attention with explicit scores for what SDPA cannot do (soft-capping, sink logits).

``selfspec.hf`` is the transformers adapter that calls into this module from the attention
interface; the drafters use the causal mask for their own attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def offset_causal_mask(q_len: int, kv_len: int, device: torch.device | str) -> torch.Tensor:
    """Causal mask ``[q, kv]`` bool for q new tokens that follow kv - q cached ones."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return torch.arange(kv_len, device=device)[None, :] <= q_pos


def causal_mask(
    q_len: int, kv_len: int, device: torch.device | str, window: int | None = None
) -> torch.Tensor:
    """``offset_causal_mask``, and with a sliding ``window`` only the keys less than ``window``
    positions behind each query's own."""
    mask = offset_causal_mask(q_len, kv_len, device)
    if window is not None:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        mask &= q_pos - torch.arange(kv_len, device=device)[None, :] < window
    return mask


@dataclass
class TreeMask:
    """Per-forward tree structure for attention; one object shared by every layer of a forward."""

    ancestor_mask: torch.Tensor  # [T, T] bool, [i, j] True iff j is i or an ancestor of i
    backend: str  # "torch" or "triton"
    exact: bool = True  # torch path: every node bitwise what a one-token step computes (see VERIFY)
    _dense: dict = field(default_factory=dict, repr=False)  # (kv_len, window) -> [1, 1, T, kv_len] bool
    _bits: torch.Tensor | None = field(default=None, repr=False)  # [T, W] int32
    _depths: torch.Tensor | None = field(default=None, repr=False)  # [T] int64
    _max_depth: int | None = field(default=None, repr=False)
    _groups: list | None = field(default=None, repr=False)  # per depth: (nodes [n], key rows [n, d+1])
    _node_keys: tuple | None = field(default=None, repr=False)  # (prefix, [(nodes, rows or None, width)])
    _ancestor_rows: tuple | None = field(default=None, repr=False)  # (prefix, rows [T, D+1], widths [T])

    def dense(self, kv_len: int, window: int | None = None) -> torch.Tensor:
        """Boolean mask ``[1, 1, T, kv_len]``: every node sees the prefix and its ancestors; with a
        sliding ``window``, only the keys less than ``window`` positions behind its own."""
        key = (kv_len, window)
        if key not in self._dense:
            anc = self.ancestor_mask
            t = anc.shape[0]
            prefix = torch.ones(t, kv_len - t, dtype=torch.bool, device=anc.device)
            mask = torch.cat([prefix, anc], dim=1)
            if window is not None:
                # Node i sits at position P + depth(i); prefix row j at position j, tree row j at
                # P + depth(j). The tree itself is never wider than a window, but stay exact.
                depth = self.depths()
                start = kv_len - t
                key_pos = torch.cat([torch.arange(start, device=anc.device), start + depth])
                mask &= (start + depth)[:, None] - key_pos[None, :] < window
            self._dense[key] = mask[None, None]
        return self._dense[key]

    def depths(self) -> torch.Tensor:
        """Depth of each node (number of strict ancestors), ``[T]``."""
        if self._depths is None:
            self._depths = self.ancestor_mask.sum(1) - 1
        return self._depths

    def reach(self, kv_len: int) -> int:
        """How far back the deepest node looks: its position minus the first key's (0) plus one.
        One host read per forward (the mask is shared by all layers), and only for windowed layers."""
        if self._max_depth is None:
            self._max_depth = int(self.depths().max())
        return kv_len - self.ancestor_mask.shape[0] + self._max_depth + 1

    def groups(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The nodes of each depth d and their ancestors, root first: ``(nodes [n_d], anc [n_d, d+1])``
        (tree-relative indices). Built once per forward; every layer's per-node attention reads it."""
        if self._groups is None:
            depths, self._groups = self.depths(), []
            for d in range(int(depths.max()) + 1):
                nodes = (depths == d).nonzero().flatten()
                # A node's ancestors are its mask row's set bits; index order is depth order.
                self._groups.append((nodes, self.ancestor_mask[nodes].nonzero()[:, 1].view(-1, d + 1)))
        return self._groups

    def node_keys(self, prefix: int) -> list[tuple[torch.Tensor, torch.Tensor | None, int]]:
        """Per depth, what each node attends to after ``prefix`` cached rows: ``(nodes [n], rows, width)``
        with ``rows`` [n, width] the cache rows of its ancestors (root first) that follow the
        prefix, or None when the depth's only node has tree rows 0..d as ancestors, so the cache's
        first ``prefix + width`` rows are its keys in place. Built once per forward (every layer
        reads the same), so the decode step does one host read per depth, not per layer."""
        if self._node_keys is None or self._node_keys[0] != prefix:
            out = []
            for nodes, anc in self.groups():
                n, width = anc.shape
                in_place = n == 1 and int(anc[0, -1]) == width - 1
                out.append((nodes, None if in_place else prefix + anc, width))
            self._node_keys = (prefix, out)
        return self._node_keys[1]

    def ancestor_rows(self, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each node's ancestors (itself last) as cache rows after ``prefix`` cached rows, root first:
        ``rows`` [T, max depth + 1] int64 (padded), ``widths`` [T]. Built once per forward."""
        if self._ancestor_rows is None or self._ancestor_rows[0] != prefix:
            anc = self.ancestor_mask
            widths = anc.sum(1)
            order = torch.arange(anc.shape[1], device=anc.device).expand_as(anc)
            # set bits first, in index order (= depth order); the padding repeats the last column
            ranked = torch.where(anc, order, anc.shape[1]).sort(1).values[:, : int(widths.max())]
            rows = prefix + ranked.clamp(max=anc.shape[1] - 1)
            self._ancestor_rows = (prefix, rows.to(torch.int64).cpu(), widths.to(torch.int64).cpu())
        return self._ancestor_rows[1], self._ancestor_rows[2]

    def bits(self) -> torch.Tensor:
        """Packed ancestor bitmask ``[T, ceil(T/32)]`` int32 for the Triton kernel."""
        if self._bits is None:
            from selfspec.kernels import tree_attention as tree_kernel  # torch + triton; only the Triton path

            self._bits = tree_kernel.pack_tree_mask(self.ancestor_mask)
        return self._bits


def window_cut(kwargs: dict, reach: int) -> int | None:
    """This layer's sliding window when it cuts something off: a query ``reach`` positions past
    the first key sees all keys when reach <= window."""
    window = kwargs.get("sliding_window")
    return int(window) if window is not None and 0 < int(window) < reach else None


def explicit_attention(
    query: torch.Tensor,  # [B, Hq, T, D]
    key: torch.Tensor,  # [B, Hkv, S, D]
    value: torch.Tensor,  # [B, Hkv, S, D]
    mask: torch.Tensor,  # bool (True = visible) or additive float, broadcastable to [B, Hq, T, S]
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None,  # [Hq] one extra logit per head, or None
) -> torch.Tensor:
    """Attention with explicit scores, for what SDPA cannot do (soft-capping, sink logits); ``[B, T, Hq, D]``."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if sinks is not None:
        # The sink is one more column of the softmax whose value row is zero: it only absorbs mass.
        sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1).float(), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores.float(), dim=-1)
    return torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous()
