"""Preallocated KV cache with in-place commit of an accepted tree path.

One tensor holds every layer's keys and values, ``[layers, 2, batch, kv_heads, max_len, head_dim]``,
so the commit of an accepted path is a single gather over all layers (one kernel launch on CUDA).
A verify forward writes the T tree tokens' K/V at rows ``length .. length+T-1``; after acceptance
the accepted nodes' rows are moved to ``length .. length+n-1`` and ``length`` advances by n. Rows
past ``length`` are scratch: the next forward overwrites them, so nothing is ever re-run.

torch only (plus the optional Triton kernel); transformers sees this store through the adapter
in ``selfspec.hf``.
"""

from __future__ import annotations

import torch

from selfspec.kernels.kv_commit import kv_commit, kv_commit_reference
from selfspec.kernels.tree_attention import HAS_TRITON


class KVStore:
    """Keys and values of every layer for one batch of sequences, preallocated to ``max_len``."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
        batch_size: int = 1,
        use_kernel: bool = False,
    ):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.kv = torch.zeros(
            num_layers, 2, batch_size, num_kv_heads, max_len, head_dim, dtype=dtype, device=device
        )  # [NL, 2, B, Hkv, S, D]
        self.length = 0  # committed rows, the same for every sequence (batch 1 engine)
        if use_kernel and not HAS_TRITON:
            raise RuntimeError("use_kernel=True needs triton; install it or use the torch reference")
        self.use_kernel = use_kernel  # Triton commit kernel (CUDA, or CPU under TRITON_INTERPRET)

    @property
    def max_len(self) -> int:
        return int(self.kv.shape[4])

    def write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor, offset: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new K/V ``[B, Hkv, T, D]`` at rows ``length+offset ..``, past the committed rows;
        return the layer's ``[B, Hkv, length+offset+T, D]`` views (everything up to the new rows)."""
        t = keys.shape[2]
        start = self.length + offset
        end = start + t
        if end > self.max_len:
            raise RuntimeError(
                f"KV cache overflow: {self.length} cached + {t} new rows > max_len {self.max_len}; "
                "allocate the store with a larger max_len (prompt + max_new_tokens + tree size)"
            )
        self.kv[layer, 0, :, :, start:end] = keys
        self.kv[layer, 1, :, :, start:end] = values
        return self.kv[layer, 0, :, :, :end], self.kv[layer, 1, :, :, :end]

    def commit(self, path: torch.Tensor) -> None:
        """Keep the rows of ``path`` (node indices relative to ``length``, increasing, root first)
        as the next committed rows, for every layer at once, then advance ``length``."""
        n = int(path.numel())
        if n == 0:
            return
        # A path 0, 1, ..., n-1 (always the case for chains, and for one-token steps) is in place.
        if int(path[-1]) != n - 1:
            lengths = torch.full((self.kv.shape[2],), self.length, dtype=torch.int32, device=self.kv.device)
            src = path.to(self.kv.device, torch.long).expand(self.kv.shape[2], n)
            count = torch.full_like(lengths, n)
            (kv_commit if self.use_kernel else kv_commit_reference)(self.kv, lengths, src, count)
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget every committed row at or after ``length``."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length
