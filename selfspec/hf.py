"""Everything that touches transformers: the attention seam, the cache adapter, target forwards.

The tree reaches attention through transformers' public interfaces only:
- ``AttentionInterface.register("selfspec", tree_attention_forward)``: the function every decoder
  layer calls. The tree structure arrives as the explicit ``selfspec_tree`` keyword (a
  ``TreeMask``), forwarded by the model's ``**kwargs`` down to each layer; explicit
  ``position_ids`` (prefix length + node depth) give each node its RoPE position.
- ``AttentionMaskInterface.register("selfspec", padding_only_mask)``: the structure (causal or tree)
  is built inside attention from the compact ancestor mask, so transformers only hands over
  padding, and the dense ``[q, kv]`` causal mask is never materialized for engine forwards.
With no ``selfspec_tree`` the function is transformers' SDPA path, so a model switched to
"selfspec" decodes exactly as with "sdpa". On CUDA with Triton the tree goes to
``selfspec.kernels.tree_attention`` (compact bitmask); elsewhere SDPA gets a boolean mask.
``SELFSPEC_ATTENTION=torch|triton`` forces one.

The KV cache is ``selfspec.cache.KVStore`` seen through ``StoreCache``, a ``transformers.Cache``
whose layers write into the preallocated store.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from selfspec import kernels
from selfspec.cache import KVStore, offset_causal_mask

ATTENTION_NAME = "selfspec"
BACKENDS = ("torch", "triton")


# ----------------------------------------------------------------------------------- the tree mask
@dataclass
class TreeMask:
    """Per-forward tree structure for attention; one object shared by every layer of a forward."""

    ancestor_mask: torch.Tensor  # [T, T] bool, [i, j] True iff j is i or an ancestor of i
    backend: str  # "torch" or "triton"
    _dense: dict = field(default_factory=dict, repr=False)  # kv_len -> [1, 1, T, kv_len] bool
    _bits: torch.Tensor | None = field(default=None, repr=False)  # [T, W] int32

    def dense(self, kv_len: int) -> torch.Tensor:
        """Boolean mask ``[1, 1, T, kv_len]``: every node sees the prefix and its ancestors."""
        if kv_len not in self._dense:
            t = self.ancestor_mask.shape[0]
            prefix = torch.ones(t, kv_len - t, dtype=torch.bool, device=self.ancestor_mask.device)
            self._dense[kv_len] = torch.cat([prefix, self.ancestor_mask], dim=1)[None, None]
        return self._dense[kv_len]

    def bits(self) -> torch.Tensor:
        """Packed ancestor bitmask ``[T, ceil(T/32)]`` int32 for the Triton kernel."""
        if self._bits is None:
            self._bits = kernels.pack_tree_mask(self.ancestor_mask)
        return self._bits


def attention_backend(device: torch.device) -> str:
    """The attention backend for ``device``: SELFSPEC_ATTENTION if set, else triton on CUDA."""
    forced = os.environ.get("SELFSPEC_ATTENTION", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"SELFSPEC_ATTENTION={forced!r} is not one of {BACKENDS}; unset it or pick one")
        if forced == "triton" and not kernels.HAS_TRITON:
            raise RuntimeError("SELFSPEC_ATTENTION=triton but triton cannot be imported here; install triton")
        return forced
    return "triton" if device.type == "cuda" and kernels.HAS_TRITON else "torch"


def tree_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, Hq, T, D]
    key: torch.Tensor,  # [B, Hkv, L+T, D]
    value: torch.Tensor,  # [B, Hkv, L+T, D]
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    selfspec_tree: TreeMask | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The "selfspec" attention: prefix + tree (or causal) attention; returns ``[B, T, Hq, D]``."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if selfspec_tree is None:
        if attention_mask is None and 1 < q_len < kv_len:
            attention_mask = offset_causal_mask(q_len, kv_len, query.device)[None, None]
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if attention_mask is not None:
        raise ValueError("tree verification takes no padding mask; the engine decodes one sequence per call")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if selfspec_tree.backend == "triton":
        prefix = torch.full((query.shape[0],), kv_len - q_len, dtype=torch.int32, device=query.device)
        return kernels.tree_attention(query, key, value, prefix, selfspec_tree.bits(), scale), None
    return sdpa_attention_forward(module, query, key, value, selfspec_tree.dense(kv_len), dropout, scale, **kwargs)


def padding_only_mask(attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """The "selfspec" mask function: causal/tree structure is applied inside attention, so only a
    real padding mask needs building (as SDPA would); none at all for unpadded input."""
    if attention_mask is None or (attention_mask.ndim == 2 and bool(attention_mask.all())):
        return None
    return sdpa_mask(attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Register the "selfspec" attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, tree_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, padding_only_mask)


# ------------------------------------------------------------------------------ the cache adapter
class _StoreLayer(CacheLayerMixin):
    """One decoder layer's view of a ``KVStore``."""

    is_sliding = False
    is_compileable = False

    def __init__(self, store: KVStore, layer: int):
        super().__init__()
        self.store, self.layer = store, layer
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # preallocated

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.store.write(self.layer, key_states, value_states)

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        # transformers passes the query length (5.2x) or the cache positions (older 5.x).
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.store.length + q, 0

    def get_seq_length(self) -> int:
        return self.store.length

    def get_max_length(self) -> int:
        return self.store.max_len


class StoreCache(Cache):
    """A ``transformers.Cache`` over a ``KVStore``: decoder layers write straight into it."""

    def __init__(self, store: KVStore):
        super().__init__(layers=[_StoreLayer(store, i) for i in range(store.kv.shape[0])])
        self.store = store


# --------------------------------------------------------------------------------- model plumbing
def check_supported(model: PreTrainedModel) -> None:
    """Raise a clear error when ``model``'s attention cannot take a tree mask through the interface."""
    name = type(model).__name__
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{name} does not route attention through transformers' AttentionInterface, so it cannot "
            "verify a token tree; use a model family that supports attn_implementation switching "
            "(Llama, Qwen2, Mistral, Gemma, Phi3, ...)"
        )
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model; selfspec speeds up decoder-only causal LMs")
    if getattr(config, "layer_types", None) and any(t != "full_attention" for t in config.layer_types):
        raise ValueError(
            f"{name} has non-full-attention layers ({sorted(set(config.layer_types))}); tree verification "
            "needs every layer to attend to the whole prefix"
        )


def sliding_window(model: PreTrainedModel) -> int | None:
    """The model's sliding-window size when it applies to some layer, else None."""
    config = model.config
    if getattr(config, "use_sliding_window", True) is False:
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


@contextlib.contextmanager
def selfspec_attention(model: PreTrainedModel) -> Iterator[None]:
    """Switch ``model`` to the "selfspec" attention for the duration; restore the previous one."""
    register()
    previous = model.config._attn_implementation
    if previous != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        if previous != ATTENTION_NAME:
            model.set_attn_implementation(previous)


def new_store(model: PreTrainedModel, max_len: int) -> KVStore:
    """A KV store sized for ``model`` (batch 1), in the model's dtype and device."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KVStore(
        num_layers=config.num_hidden_layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_len=max_len,
        dtype=model.dtype,
        device=model.device,
        use_kernel=attention_backend(model.device) == "triton",
    )


@dataclass(frozen=True)
class TargetOutput:
    logits: torch.Tensor  # [T, V] fp32 logits at each input position / tree node
    hidden: torch.Tensor  # [T, F] what the drafter reads: the last hidden state (F = H), or the
    # hidden states of ``layers`` concatenated (EAGLE-3's fused input, F = len(layers) * H)


def target_forward(
    model: PreTrainedModel,
    cache: StoreCache,
    tokens: torch.Tensor,  # [T] int64, new tokens (prompt chunk, one token, or tree nodes)
    depths: torch.Tensor | None = None,  # [T] int64 tree depths; None = consecutive positions
    tree: TreeMask | None = None,  # None = causal over the new tokens
    layers: tuple[int, ...] = (-1,),  # hidden-state indices the drafter reads (0 = embeddings)
) -> TargetOutput:
    """One target forward over new tokens after the committed cache rows; K/V land in the store
    (rows ``length .. length+T-1``) and are committed later by ``KVStore.commit``."""
    start = cache.store.length
    offsets = depths if depths is not None else torch.arange(tokens.shape[0], device=tokens.device)
    out = model(
        input_ids=tokens[None],
        position_ids=(offsets + start)[None],
        past_key_values=cache,
        use_cache=True,
        output_hidden_states=True,
        selfspec_tree=tree,
    )
    states = out.hidden_states
    hidden = states[layers[0]][0] if len(layers) == 1 else torch.cat([states[i][0] for i in layers], -1)
    return TargetOutput(logits=out.logits[0].float(), hidden=hidden)


@dataclass(frozen=True)
class Features:
    hidden: torch.Tensor  # [B, N, H] the last hidden state the drafters read (what lm_head reads)
    logits: torch.Tensor  # [B, N, V] the target's logits
    layers: tuple[torch.Tensor, ...]  # the embeddings' and every layer's output, [B, N, H] each


@torch.no_grad()
def target_features(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Features:
    """The frozen target's features for whole sequences (training, calibration): the same hidden
    state ``generate`` hands the drafters, plus logits and per-layer states (EAGLE-3 fusion)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    return Features(hidden=out.hidden_states[-1], logits=out.logits, layers=tuple(out.hidden_states))
