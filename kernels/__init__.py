"""Triton kernels of the verify step, each with a plain-torch reference of the same semantics.

- :func:`tree_attention` -- T draft-tree tokens attend to their cached prefix and ancestors.
- :func:`kv_commit` -- move the accepted path's K/V rows into place, all layers in one launch.
- :func:`pack_tree_mask` -- the bit-packed ancestor mask the attention kernel reads.

Both kernels are registered as torch custom ops (``torch.ops.selfspec.tree_attention``,
``torch.ops.selfspec.kv_commit``) so torch.compile and CUDA graphs see them. Where triton cannot
be imported ``HAS_TRITON`` is False, the references still work, and the kernel entry points raise.
"""

from .kv_commit import kv_commit, kv_commit_reference
from .tree_attention import (
    HAS_TRITON,
    pack_tree_mask,
    tree_attention,
    tree_attention_reference,
    unpack_tree_bits,
)

__all__ = [
    "HAS_TRITON",
    "kv_commit",
    "kv_commit_reference",
    "pack_tree_mask",
    "tree_attention",
    "tree_attention_reference",
    "unpack_tree_bits",
]
