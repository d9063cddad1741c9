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

The per-layer attention options that models pass to the interface are honoured in both paths,
so every layer sees what it would see in plain decoding: ``sliding_window`` (Mistral, Gemma 2/3,
gpt-oss, Phi-3: a node at position p sees keys at positions > p - window), ``softcap`` (Gemma 2:
scores through ``softcap * tanh(s / softcap)``) and ``s_aux``/``sinks`` (gpt-oss: one learned
logit per head joins the softmax and takes its share of the mass). The last two need scores that
SDPA does not expose, so those layers run a plain-torch attention, as does any layer whose window
actually cuts the prefix (the Triton kernel has no window).

The mask math and the explicit-score attention are ``selfspec.attention`` (torch only); this
module is the thin adapter. The KV cache is ``selfspec.cache.KVStore`` seen through ``StoreCache``,
a ``transformers.Cache`` whose layers write into the preallocated store.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from selfspec.attention import TreeMask, causal_mask, explicit_attention, window_cut
from selfspec.cache import KVStore
from selfspec.invariance import fast_layers, linear_plans, row_exact_scope
from selfspec.kernels import cpu_attention
from selfspec.kernels import tree_attention as tree_kernel

ATTENTION_NAME = "selfspec"
BACKENDS = ("torch", "triton")
# How a tree is verified on the torch path. "exact": each node's logits, hidden states and K/V are
# bitwise what one-token decoding computes at that node (per-depth attention over each node's own
# keys, row-exact linear layers; see selfspec.invariance), so greedy output is bitwise the model's
# own in any dtype. "batched": one masked attention call and plain multi-row GEMMs per forward,
# cheaper on a CPU, equal to one-token decoding only up to the last bit (greedy output may differ
# from HF at a near-tie, more often in bf16).
VERIFY = ("exact", "batched")
# Layer kinds (``config.layer_types``) whose attention this module reproduces exactly for a tree.
SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention"}


def attention_backend(device: torch.device) -> str:
    """The attention backend for ``device``: SELFSPEC_ATTENTION if set, else triton on CUDA."""
    forced = os.environ.get("SELFSPEC_ATTENTION", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"SELFSPEC_ATTENTION={forced!r} is not one of {BACKENDS}; unset it or pick one")
        if forced == "triton" and not tree_kernel.HAS_TRITON:
            raise RuntimeError("SELFSPEC_ATTENTION=triton but triton cannot be imported here; install triton")
        return forced
    return "triton" if device.type == "cuda" and tree_kernel.HAS_TRITON else "torch"


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
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    softcap = kwargs.pop("softcap", None)
    sinks = kwargs.pop("s_aux", None)
    if sinks is None:
        sinks = kwargs.pop("sinks", None)
    if selfspec_tree is None:
        window = window_cut(kwargs, kv_len)  # the last query sits kv_len - 1 positions past the first key
        if attention_mask is None and (
            window is not None or 1 < q_len < kv_len or softcap is not None or sinks is not None
        ):
            attention_mask = causal_mask(q_len, kv_len, query.device, window)[None, None]
        if softcap is not None or sinks is not None:
            return explicit_attention(query, key, value, attention_mask, scale, softcap, sinks), None
        if (
            q_len == 1
            and attention_mask is None
            and query.shape[0] == 1
            and key.stride() == value.stride()
            and cpu_kernel_attention(module, query, scale)
        ):
            # A one-token step: the kernel computes the library's bits, without its per-head overhead.
            out = cpu_attention.attend_all(query[0].transpose(0, 1), key[0], value[0], scale)
            return out[None], None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if attention_mask is not None:
        raise ValueError("tree verification takes no padding mask; the engine decodes one sequence per call")
    if kwargs.get("position_bias") is not None:
        # A bias the model builds over cache slots would be wrong for tree nodes, whose positions
        # are prefix + depth, not their slots.
        raise ValueError(
            f"{type(module).__name__} adds a position bias inside attention, which tree verification "
            "cannot reproduce; use a model with rotary or learned positions"
        )
    window = window_cut(kwargs, selfspec_tree.reach(kv_len)) if kwargs.get("sliding_window") else None
    plain = window is None and softcap is None and sinks is None
    if selfspec_tree.backend == "triton" and plain:
        prefix = torch.full((query.shape[0],), kv_len - q_len, dtype=torch.int32, device=query.device)
        return tree_kernel.tree_attention(query, key, value, prefix, selfspec_tree.bits(), scale), None
    if plain and selfspec_tree.exact:
        return _per_node_attention(module, query, key, value, selfspec_tree, dropout, scale, **kwargs), None
    mask = selfspec_tree.dense(kv_len, window)
    if softcap is not None or sinks is not None:
        return explicit_attention(query, key, value, mask, scale, softcap, sinks), None
    return sdpa_attention_forward(module, query, key, value, mask, dropout, scale, **kwargs)


_KERNEL_CHECKED: dict[tuple, bool] = {}  # (Hq, Hkv, D, scale, threads) -> kernel bitwise equal to SDPA here
# key counts checked: every tail of a 4-key group and of a 16-key exp chunk, one block, two and three blocks
KERNEL_CHECK_LENGTHS = (1, 2, 3, 6, 7, 18, 19, 62, 63, 64, 100, 514, 515, 1100, 1103)


def cpu_kernel_attention(module: torch.nn.Module, query: torch.Tensor, scale: float) -> bool:
    """Whether this layer's single-query attention may run as ``kernels.cpu_attention``: bf16 on
    CPU, a supported head size, not turned off (``SELFSPEC_CPU_ATTENTION=0``), and the kernel found
    bitwise equal to the library's one-query SDPA call (the call plain decoding makes) for these
    head counts, scale and thread count, on inputs whose outputs cancel (where any difference in
    summation order shows) at every tail length of its groups and blocks. Checked once per process
    and shape; False keeps SDPA."""
    if os.environ.get("SELFSPEC_CPU_ATTENTION", "1").strip() == "0":
        return False
    if query.device.type != "cpu" or getattr(module, "training", False):
        return False
    hq, d = query.shape[1], query.shape[-1]
    groups = int(getattr(module, "num_key_value_groups", 1))
    if not cpu_attention.supports(d, query.dtype) or hq % groups:
        return False
    key = (hq, hq // groups, d, float(scale), torch.get_num_threads())
    if key not in _KERNEL_CHECKED:
        _KERNEL_CHECKED[key] = cpu_attention.available() and _kernel_matches_sdpa(*key[:4], groups)
    return _KERNEL_CHECKED[key]


@torch.inference_mode()
def _kernel_matches_sdpa(hq: int, hkv: int, d: int, scale: float, groups: int) -> bool:
    g = torch.Generator().manual_seed(hq * 1009 + d)
    probe = type("Probe", (), {"is_causal": True, "training": False, "num_key_value_groups": groups})()
    for length in KERNEL_CHECK_LENGTHS:
        for _ in range(6):
            q, k, v = cpu_attention.cancelling_case(hq, hkv, d, length, scale, g)
            ref, _ = sdpa_attention_forward(probe, q[:, :, None], k[None], v[None], None, 0.0, scale)
            out = cpu_attention.attend_all(q, k, v, scale)
            if not torch.equal(out, ref[0]):
                return False
    return True


def _per_node_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, Hq, T, D]
    key: torch.Tensor,  # [1, Hkv, P+T, D]
    value: torch.Tensor,  # [1, Hkv, P+T, D]
    tree: TreeMask,
    dropout: float,
    scale: float,
    **kwargs,
) -> torch.Tensor:
    """Tree attention with each node's result bitwise what a one-token step computes there
    (row invariance, see ``selfspec.invariance``). Where ``cpu_kernel_attention`` allows it, one
    call of the CPU kernel for all nodes (the prefix read in place). Otherwise per depth d, one
    unmasked SDPA call over a batch of single-query problems, node i attending to exactly its own P + d + 1 keys (the prefix, then
    its ancestors in depth order), which is the call plain decoding makes at that position. A
    masked call over all T queries reduces over other key counts and blocks and differs in the
    last bit. The cost: a copy of the prefix's K/V per node that is not on the tree's first chain,
    and the attention kernel's work per node (each node reads its whole prefix, where a masked
    call reads it once for all); returns ``[1, T, Hq, D]``."""
    if query.shape[0] != 1:
        raise ValueError("tree verification decodes one sequence per call (batch 1)")
    t, kv_len = query.shape[2], key.shape[2]
    prefix = kv_len - t
    if cpu_kernel_attention(module, query, scale) and key.stride() == value.stride():
        rows, widths = tree.ancestor_rows(prefix)  # one pass over the prefix for all nodes, no copies
        out = cpu_attention.tree_attention(
            query[0].transpose(0, 1), key[0], value[0], prefix, rows, widths, scale
        )
        return out[None]
    out = query.new_empty(1, t, query.shape[1], query.shape[3])
    for nodes, rows, width in tree.node_keys(prefix):
        if rows is None:  # the cache is in order for this node
            k, v = key[:, :, : prefix + width], value[:, :, : prefix + width]
        else:  # [n, Hkv, P+d+1, D]: the shared prefix, then each node's ancestors (a copy per node)
            n = rows.shape[0]
            k = torch.cat([key[:, :, :prefix].expand(n, -1, -1, -1), key[0][:, rows].transpose(0, 1)], 2)
            v = torch.cat([value[:, :, :prefix].expand(n, -1, -1, -1), value[0][:, rows].transpose(0, 1)], 2)
        q = query[0][:, nodes, None].transpose(0, 1)  # [n, Hq, 1, D]
        o, _ = sdpa_attention_forward(module, q, k, v, None, dropout, scale, **kwargs)  # [n, 1, Hq, D]
        out[0, nodes] = o[:, 0]
    return out


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


# ------------------------------------------------- the two private transformers attributes we read
# Both are read here and nowhere else. Checked on transformers 5.0 through 5.24 (the versions the
# test suite ran on); transformers offers no public getter for either.
def routes_attention_through_interface(model: PreTrainedModel) -> bool:
    """``PreTrainedModel._supports_attention_backend``: True for model classes whose layers call the
    function registered in ``AttentionInterface`` (what lets a tree reach attention)."""
    return bool(getattr(model, "_supports_attention_backend", False))


def current_attention(model: PreTrainedModel) -> str:
    """``config._attn_implementation``: the attention the model uses now (set through the public
    ``set_attn_implementation``)."""
    return model.config._attn_implementation


# --------------------------------------------------------------------------------- model plumbing
def check_supported(model: PreTrainedModel) -> None:
    """Raise a clear error when ``model``'s attention cannot take a tree mask through the interface."""
    name = type(model).__name__
    if not routes_attention_through_interface(model):
        raise ValueError(
            f"{name} does not route attention through transformers' AttentionInterface, so it cannot "
            "verify a token tree; use a model family that supports attn_implementation switching "
            "(Llama, Qwen2, Mistral, Gemma, Phi3, ...)"
        )
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model; selfspec speeds up decoder-only causal LMs")
    other = sorted(set(getattr(config.get_text_config(), "layer_types", None) or ()) - SUPPORTED_LAYER_TYPES)
    if other:
        raise ValueError(
            f"{name} has {', '.join(other)} layers; tree verification supports full and sliding-window "
            "attention layers only (their state must be rewindable to any accepted prefix)"
        )


@contextlib.contextmanager
def selfspec_attention(model: PreTrainedModel) -> Iterator[None]:
    """Switch ``model`` to the "selfspec" attention for the duration; restore the previous one."""
    register()
    previous = current_attention(model)
    if previous != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        if previous != ATTENTION_NAME:
            model.set_attn_implementation(previous)


@dataclass(frozen=True)
class Geometry:
    """The attention shape of a target, read from its (text) config in one place: heads, KV heads
    (GQA; = heads when the config names none), head size (hidden / heads when it names none)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def geometry(model: PreTrainedModel) -> Geometry:
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    return Geometry(
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
    )


def new_store(model: PreTrainedModel, max_len: int) -> KVStore:
    """A KV store sized for ``model`` (batch 1), in the model's dtype and device."""
    g = geometry(model)
    return KVStore(
        num_layers=g.num_layers,
        num_kv_heads=g.num_kv_heads,
        head_dim=g.head_dim,
        max_len=max_len,
        dtype=model.dtype,
        device=model.device,
        use_kernel=attention_backend(model.device) == "triton",
    )


# model -> ((dtype, threads), plans of the row-variant layers, fast layers)
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def row_exact(model: PreTrainedModel, decode: bool = False) -> contextlib.AbstractContextManager:
    """A context in which the model's linear layers give every tree node its one-row result: the
    layers measured not row-invariant here run through ``selfspec.invariance.row_exact_scope``
    (none: a no-op). ``decode``: a decode step (one token or a tree, never a prefill, whose
    library calls plain decoding shares), where the row-invariant layers the blocked kernel
    reproduces bitwise and runs faster (``invariance.fast_layers``) use it too, unless
    ``SELFSPEC_CPU_KERNELS=0``. The plans are measured once per model, dtype and thread count."""
    key = (model.dtype, torch.get_num_threads())
    entry = _PLANS.get(model)
    if entry is None or entry[0] != key:
        entry = _PLANS[model] = (key, linear_plans(model), fast_layers(model))
    return row_exact_scope(entry[1], entry[2] if decode else None)


@dataclass(frozen=True)
class TargetOutput:
    logits: torch.Tensor  # [T, V] fp32 logits at each input position / tree node
    hidden: torch.Tensor  # [T, F] what the drafter reads: the last hidden state (F = H), or the
    # hidden states of ``feature_layers`` concatenated (EAGLE-3's fused input, F = len(layers) * H)


def target_forward(
    model: PreTrainedModel,
    cache: StoreCache,
    tokens: torch.Tensor,  # [T] int64, new tokens (prompt chunk, one token, or tree nodes)
    depths: torch.Tensor | None = None,  # [T] int64 tree depths; None = consecutive positions
    tree: TreeMask | None = None,  # None = causal over the new tokens
    feature_layers: tuple[int, ...] = (-1,),  # hidden-state indices the drafter reads (0 = embeddings)
    last_logits_only: bool = False,  # prefill: logits of the last position only (as HF generate)
) -> TargetOutput:
    """One target forward over new tokens after the committed cache rows; K/V land in the store
    (rows ``length .. length+T-1``) and are committed later by ``KVStore.commit``."""
    start = cache.store.length
    offsets = depths if depths is not None else torch.arange(tokens.shape[0], device=tokens.device)
    extra = {"logits_to_keep": 1} if last_logits_only else {}
    exact_tree = tree is not None and tree.exact and tree.backend == "torch"
    one_token = tree is None and tokens.shape[0] == 1 and not last_logits_only
    with row_exact(model, decode=True) if exact_tree or one_token else contextlib.nullcontext():
        out = model(
            input_ids=tokens[None],
            position_ids=(offsets + start)[None],
            use_cache=True,
            output_hidden_states=True,
            selfspec_tree=tree,
            **{cache_argument(model): cache},
            **extra,
        )
    states = out.hidden_states
    picked = [states[i][0] for i in feature_layers]
    hidden = picked[0] if len(picked) == 1 else torch.cat(picked, -1)
    return TargetOutput(logits=out.logits[0].float(), hidden=hidden)


def cache_argument(model: PreTrainedModel) -> str:
    """The forward keyword that takes the cache: ``cache`` from transformers 5.2x (where
    ``past_key_values`` still works but warns that it is deprecated), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class Features:
    hidden: torch.Tensor  # [B, N, H] the last hidden state the drafters read (what lm_head reads)
    logits: torch.Tensor  # [B, N, V] the target's logits
    layers: tuple[torch.Tensor, ...]  # the embeddings' and every layer's output, [B, N, H] each


@torch.no_grad()
def target_features(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> Features:
    """The frozen target's features for whole sequences (training, calibration): the same hidden
    state ``generate`` hands the drafters, plus logits and per-layer states (EAGLE-3 fusion)."""
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
    )
    return Features(hidden=out.hidden_states[-1], logits=out.logits, layers=tuple(out.hidden_states))
