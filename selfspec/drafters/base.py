"""What every drafter shares: config, the propose protocol, save/load with compatibility checks.

A drafter is a small ``nn.Module`` over a frozen target. It borrows the target's token embedding
and ``lm_head`` (``SharedModules``, held outside the module tree so they are neither saved nor
trained nor counted), and owns only its own few parameters.

Protocol, once per decode step:
    state = drafter.begin(max_len)                              # per generation
    draft = drafter.propose(state, hidden, next_tokens, tree)   # per step
``hidden[i]`` ``[n, H]`` is the target's last hidden state at each position committed since the last
call (the whole prompt at first, the accepted path afterwards) and ``next_tokens[i]`` the token
that follows it; the last of them is the bonus token, which becomes the draft tree's root.

On disk: ``config.json`` (kind, sizes, target fingerprint, tree) + ``model.safetensors``.

Two optional extras change how a drafter reads out tokens (``lm_head``), both built by
``VocabProjection`` over the target's frozen ``lm_head`` weight, which is never copied to disk:
- a reduced draft vocabulary (``draft_vocab_size`` > 0): only the target rows of the most frequent
  tokens are scored (less work per draft step); ``draft_ids`` ``[Vd]`` maps draft to target ids and
  is saved with the weights;
- a PEFT LoRA adapter on the read-out (``add_vocab_lora``), saved as PEFT's own
  ``adapter_config.json`` + ``adapter_model.safetensors`` beside the core files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from selfspec.io import replace_dir, temp_dir_beside
from selfspec.sampling import CandidateSampler
from selfspec.tree import (
    DraftVocab,
    DynamicTree,
    LevelProbs,
    TreeBuffers,
    build_tree,
    grow_sampled_tree,
    grow_tree,
    level_quotas,
    medusa_proposer,
    prior_acceptance,
    sample_children,
)

FORMAT_VERSION = 1
# Config keys renamed since format 1 was first written (old -> new); files with the old name load.
RENAMED_KEYS = {"fuse_layers": "feature_layers"}
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"  # PEFT's file name; its presence means a LoRA read-out
VOCAB_PREFIX = "vocab."  # state-dict keys of the read-out: derived from the target or PEFT-saved


@dataclass
class DrafterConfig:
    """Fields every drafter kind has; kinds extend it with their own (each with a help string)."""

    hidden_size: int = dataclasses.field(metadata={"help": "target hidden size (must match the target)"})
    vocab_size: int = dataclasses.field(metadata={"help": "target vocabulary size (must match the target)"})
    target_architecture: str = dataclasses.field(
        default="", metadata={"help": "target class name, e.g. LlamaForCausalLM (checked at load)"}
    )
    target_name: str = dataclasses.field(
        default="", metadata={"help": "informational: the target it was trained on"}
    )
    tree: list[list[int]] | None = dataclasses.field(
        default=None, metadata={"help": "static tree as Medusa-style paths; None = the kind's default tree"}
    )
    draft_vocab_size: int = dataclasses.field(
        default=0,
        metadata={"help": "tokens the drafter scores (a reduced draft vocabulary); 0 = all of vocab_size"},
    )
    acceptance: list[list[float]] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "measured [depth][rank] acceptance on held-out data, written by calibration; "
            "tree='auto' reads it (None = a prior)"
        },
    )

    def __post_init__(self):
        for name in ("hidden_size", "vocab_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(
                f"draft_vocab_size must be in [0, vocab_size={self.vocab_size}] (0 = full vocabulary), "
                f"got {self.draft_vocab_size}"
            )
        if self.tree is not None:
            build_tree(self.tree)  # raises a ValueError naming the bad path
        if self.acceptance is not None:
            acc = torch.as_tensor(self.acceptance, dtype=torch.float64)
            if acc.ndim != 2 or acc.numel() == 0 or bool(((acc < 0) | (acc > 1)).any()):
                raise ValueError(
                    "acceptance must be a non-empty [depth][rank] matrix of probabilities in [0, 1]"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SharedModules:
    """The target's frozen modules a drafter reads through; never part of the drafter's state."""

    embed: nn.Module  # token ids [N] -> [N, H]
    lm_head: nn.Module  # [N, H] -> [N, V]


@dataclass(frozen=True)
class Draft:
    """One step's proposal: a tree and its node tokens (node 0 is the bonus token)."""

    tree: TreeBuffers
    tokens: torch.Tensor  # [T] int64
    # [T, V] fp32, the distribution each node's token was drawn from (sampled candidates; row 0,
    # the root, unused); None: deterministic candidates (top-k), tried as point masses
    probs: torch.Tensor | None = None


class VocabProjection(nn.Module):
    """The drafter's read-out ``[N, H] -> [N, Vd]`` over the target's frozen ``lm_head`` weight.

    ``proj`` is the drafter's own ``nn.Linear`` whose weight IS the target's tensor (shared
    storage; the target's module is never touched) or, for a reduced draft vocabulary, a gather of
    its rows ``draft_ids``. Either is a non-persistent buffer, not a parameter: never trained,
    saved or counted, and ``.to()`` gives the drafter a converted copy instead of converting the
    target's tensor in place. PEFT wraps ``proj`` for a LoRA read-out.
    """

    def __init__(self, lm_head: nn.Module, draft_ids: torch.Tensor | None = None):
        super().__init__()
        weight, bias = lm_head.weight.detach(), getattr(lm_head, "bias", None)
        bias = None if bias is None else bias.detach()
        if draft_ids is not None:
            ids = draft_ids.to(weight.device)
            weight, bias = weight[ids], None if bias is None else bias[ids]
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        for name, tensor in (("weight", weight), ("bias", bias)):
            delattr(self.proj, name)
            self.proj.register_buffer(name, tensor, persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)

    @contextlib.contextmanager
    def as_parameters(self) -> Iterator[None]:
        """PEFT reads the device off a module's parameters while it wraps it: for that time, show
        the weight as a frozen parameter (same storage), then make it a buffer again."""
        linear = self.proj
        tensors = {name: getattr(linear, name) for name in ("weight", "bias")}
        for name, t in tensors.items():
            delattr(linear, name)
            linear.register_parameter(name, None if t is None else nn.Parameter(t, requires_grad=False))
        try:
            yield
        finally:
            for name, t in tensors.items():
                delattr(linear, name)
                linear.register_buffer(name, t, persistent=False)


def target_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The facts of a target that a drafter depends on."""
    config = model.config.get_text_config()
    return {
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(model.get_output_embeddings().weight.shape[0]),
        "target_architecture": type(model).__name__,
    }


class Drafter(nn.Module):
    """Base class: shared modules, default tree, save/load. Subclasses set ``kind``/``config_class``
    and implement ``begin`` and ``propose``."""

    kind: ClassVar[str] = ""
    config_class: ClassVar[type[DrafterConfig]] = DrafterConfig
    # Target hidden states propose() reads, as indices into transformers' ``hidden_states`` tuple
    # (0 = embeddings, i = output of layer i, -1 = the last, normed state lm_head reads).
    feature_layers: tuple[int, ...] = (-1,)

    def __init__(self, config: DrafterConfig, shared: SharedModules):
        super().__init__()
        self.config = config
        self._shared = shared  # a dataclass, so nn.Module does not register (save, train) it
        self._tree: tuple[tuple, TreeBuffers] | None = None  # (paths, built) cache of ``tree``
        self.vocab: nn.Module | None = None  # VocabProjection (maybe PEFT-wrapped); None = the shared lm_head
        if config.draft_vocab_size:  # [Vd] int64 target id of each draft token, set by set_draft_vocab
            self.register_buffer("draft_ids", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        else:
            self.draft_ids = None

    @property
    def tree(self) -> TreeBuffers:
        """The static tree propose() uses unless given another: built from ``config.tree`` (the
        one owner of the paths, as saved and as calibration sets them) or the kind's default."""
        paths = self.config.tree if self.config.tree is not None else self.default_paths()
        key = tuple(tuple(p) for p in paths)
        if self._tree is None or self._tree[0] != key:
            self._tree = (key, build_tree(paths))
        return self._tree[1]

    def default_paths(self) -> list[tuple[int, ...]]:
        """The kind's default static tree when the config names none (before calibration)."""
        raise NotImplementedError

    def begin(self, max_len: int) -> Any:
        """Per-generation state (e.g. a drafter KV cache); None for stateless drafters."""
        return None

    def propose(
        self,
        state: Any,
        hidden: torch.Tensor,
        next_tokens: torch.Tensor,
        tree: TreeBuffers,
        sampler: CandidateSampler | None = None,
    ) -> Draft:
        """One step's draft. ``sampler`` None: each node takes the drafter's top candidate of its
        rank; given: candidates are drawn from the drafter's warped distribution (siblings without
        replacement) and ``Draft.probs`` says what each was drawn from."""
        raise NotImplementedError

    def candidate_distribution(
        self, h: torch.Tensor, sampler: CandidateSampler
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For rows h [N, H]: the warped distribution [N, Vd] candidates are drawn from and the raw
        logits [N, Vd] (fp32) that rank fillers, over the draft vocabulary (``draft_vocab`` maps
        its columns to target tokens). Warping only the draft columns is the same distribution as
        warping the full vocabulary with the other tokens ruled out, as ``lm_head`` does."""
        logits = self.draft_logits(h).float()
        return sampler.probs(logits), logits

    def grow_sampled(
        self,
        root_token: torch.Tensor,
        level_probs: LevelProbs,
        spec: DynamicTree,
        depth: int,
        sampler: CandidateSampler,
    ) -> Draft:
        """A dynamic tree of sampled candidates (``grow_sampled_tree``) at most ``depth`` levels
        deep: each level's node quota is the depth profile of the best static tree of
        ``spec.budget`` nodes for this drafter's acceptance; ``level_probs`` gives its
        distributions over the draft vocabulary."""
        quotas = level_quotas(self.acceptance_matrix(depth, spec.top_k), spec.budget, depth)
        tree, tokens, probs = grow_sampled_tree(
            root_token, level_probs, quotas, spec.top_k, spec.expand, sampler.generator, self.draft_vocab
        )
        return Draft(tree=tree, tokens=tokens, probs=probs)

    def propose_per_depth(
        self,
        states: torch.Tensor,
        root_token: torch.Tensor,
        tree: TreeBuffers | DynamicTree,
        sampler: CandidateSampler | None = None,
    ) -> Draft:
        """The draft of a drafter whose candidates at depth d do not depend on the tokens above
        them (Medusa heads, a block drafter): ``states`` [D, H] are read out once per depth and
        every node of depth d takes depth d's candidate of its rank (static tree), grows from
        them by score (dynamic tree), or draws its children from depth d's warped distribution,
        siblings without replacement (sampled)."""
        if isinstance(tree, DynamicTree):
            depth = min(tree.depth, states.shape[0])
            if sampler is not None:
                q = self.candidate_distribution(states[:depth], sampler)[0]  # [D, Vd]
                return self.grow_sampled(
                    root_token, lambda pool, frontier, level: q[level], tree, depth, sampler
                )
            logprobs, ids = self.top_candidates(states[:depth], tree.top_k)  # [D, K] each
            grown, tokens = grow_tree(
                root_token, medusa_proposer(logprobs, ids), depth, tree.expand, tree.budget
            )
            return Draft(tree=grown, tokens=tokens)
        if tree.max_depth > states.shape[0]:
            raise ValueError(
                f"tree depth {tree.max_depth} exceeds the {states.shape[0]} depths this drafter drafts"
            )
        depth = max(tree.max_depth, 1)
        if sampler is None:
            top = self.top_candidates(states[:depth], tree.size)[1]  # [D, T] token ids
            tokens = top[(tree.depths - 1).clamp(min=0), tree.ranks.clamp(min=0)]  # [T]
            tokens[0] = root_token
            return Draft(tree=tree, tokens=tokens)
        q, logits = self.candidate_distribution(states[:depth], sampler)  # [D, Vd]
        tokens = root_token.new_empty(tree.size)
        tokens[0] = root_token
        probs = q.new_zeros(tree.size, self.config.vocab_size)
        bounds = tree.level_bounds
        for d in range(1, len(bounds) - 1):
            lo, hi, plo = bounds[d], bounds[d + 1], bounds[d - 1]
            n = lo - plo  # the parents (depth d - 1 nodes), each drawing its own children
            tokens[lo:hi], probs[lo:hi] = sample_children(
                tree,
                lo,
                hi,
                q[d - 1].expand(n, -1),
                plo,
                sampler.generator,
                logits[d - 1].expand(n, -1),
                self.draft_vocab,
            )
        return Draft(tree=tree, tokens=tokens, probs=probs)

    @property
    def draft_vocab(self) -> DraftVocab | None:
        """The reduced draft vocabulary's map to target tokens; None for the full vocabulary."""
        if self.draft_ids is None:
            return None
        return DraftVocab(self.draft_ids, self.config.vocab_size)

    def acceptance_matrix(self, depth: int, top_k: int) -> torch.Tensor:
        """[depth, top_k] acceptance by depth and rank: the calibrated one (``config.acceptance``)
        or a prior; it shapes trees (``tree='auto'``, sampled dynamic trees)."""
        if self.config.acceptance:
            return torch.tensor(self.config.acceptance, dtype=torch.float64)
        return prior_acceptance(depth, top_k, first=0.6, decay=0.8)

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V] logits over the target vocabulary (-inf outside a reduced draft vocabulary)."""
        logits = self.draft_logits(h)
        if self.draft_ids is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        return full.scatter_(-1, self.draft_ids.expand_as(logits), logits)

    def top_candidates(self, h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most likely next tokens at each row of ``h`` [N, H]: (log-probs [N, k] fp32,
        target token ids [N, k]), computed over the draft vocabulary only (a reduced vocabulary
        is never scattered into the full one: 6x less softmax and top-k work for 8k of 49k)."""
        logprobs = self.draft_logits(h).float().log_softmax(-1)  # [N, Vd]
        top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        values, ids = top.values, top.indices if self.draft_ids is None else self.draft_ids[top.indices]
        if ids.shape[-1] < k:  # more ranks asked than draft tokens: repeat the last (never better)
            pad = k - ids.shape[-1]
            values = torch.cat([values, values[:, -1:].expand(-1, pad)], -1)
            ids = torch.cat([ids, ids[:, -1:].expand(-1, pad)], -1)
        return values, ids

    def draft_logits(self, h: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, Vd] logits over the draft vocabulary (what training scores)."""
        return self._shared.lm_head(h) if self.vocab is None else self.vocab(h)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self._shared.embed(ids)

    def set_draft_vocab(self, draft_ids: torch.Tensor) -> None:
        """Score only the target tokens ``draft_ids`` [Vd] (distinct ids, e.g. the most frequent)."""
        if self.vocab is not None and not isinstance(self.vocab, VocabProjection):
            raise ValueError(
                "set the draft vocabulary before adding a LoRA read-out (the adapter is sized by it)"
            )
        ids = torch.as_tensor(draft_ids, dtype=torch.long).flatten()
        if ids.numel() != self.config.draft_vocab_size or ids.unique().numel() != ids.numel():
            raise ValueError(
                f"draft_ids must hold draft_vocab_size={self.config.draft_vocab_size} distinct token ids, "
                f"got {ids.numel()} ({ids.unique().numel()} distinct)"
            )
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ValueError(f"draft_ids must be target token ids in [0, {self.config.vocab_size})")
        self.draft_ids.copy_(ids)
        self.vocab = VocabProjection(self._shared.lm_head, self.draft_ids)

    def add_vocab_lora(self, lora_config: Any) -> None:
        """Wrap the read-out with a PEFT LoRA (``peft.LoraConfig``; target_modules is set here)."""
        import peft

        if self.vocab is not None and not isinstance(self.vocab, VocabProjection):
            raise ValueError("this drafter already has a LoRA read-out")
        base = self.vocab if self.vocab is not None else VocabProjection(self._shared.lm_head)
        lora_config = dataclasses.replace(lora_config, target_modules=["proj"])
        with base.as_parameters():
            self.vocab = peft.get_peft_model(base, lora_config)

    def load_vocab_lora(self, directory: Path, trainable: bool = False) -> None:
        """Attach the PEFT adapter saved in ``directory`` to the read-out."""
        import peft

        base = self.vocab if self.vocab is not None else VocabProjection(self._shared.lm_head)
        p = next(self.parameters(), None)
        with base.as_parameters():
            self.vocab = peft.PeftModel.from_pretrained(base, str(directory), is_trainable=trainable)
        if p is not None:
            self.vocab.to(device=p.device, dtype=p.dtype)

    def num_parameters_own(self) -> int:
        """Parameters the drafter owns (the shared embedding and lm_head are not counted)."""
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` atomically (a kill leaves the old files)."""
        directory = Path(directory)
        tmp = temp_dir_beside(directory)
        try:
            meta = {"format_version": FORMAT_VERSION, "kind": self.kind, **self.config.to_dict()}
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
            state = {
                k: v.detach().contiguous().cpu()
                for k, v in self.state_dict().items()
                if not k.startswith(VOCAB_PREFIX)
            }
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"kind": self.kind})
            if self.vocab is not None and not isinstance(self.vocab, VocabProjection):
                self.vocab.save_pretrained(str(tmp))  # PEFT adapter files (the LoRA weights only)
            replace_dir(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return directory


# --------------------------------------------------------------------------- training protocol
# What training and calibration (selfspec.training) may call on a drafter, beside the Drafter
# base's read-out (``draft_logits``, ``lm_head``, ``draft_ids``, ``set_draft_vocab``,
# ``add_vocab_lora``), ``feature_layers``, ``kind`` and ``config``. A new kind is trainable by
# offering one of these (TrainableHeads, TrainableStep, TrainableBlock); nothing else of its module
# layout is read outside the drafter (the exporter maps weights, so it reads the modules it writes).
@runtime_checkable
class TrainableHeads(Protocol):
    """A drafter that predicts every depth from one target state (Medusa): trained by scoring
    depth k's state against the token k+2 ahead."""

    def depth_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] target states -> [N, K, H], one state per depth, read by ``draft_logits``."""
        ...


@runtime_checkable
class TrainableStep(Protocol):
    """A drafter that takes one autoregressive step per depth over its own KV cache (EAGLE kinds):
    trained unrolled (training-time test), one ``step`` over all unrolled rows."""

    regresses_features: bool  # True: the step's output is also regressed on the target's next state

    def lift(self, features: torch.Tensor) -> torch.Tensor:
        """[N, F] target features (``feature_layers`` concatenated) -> [N, H] root-step state."""
        ...

    def step_input(self, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[N, H] state (lifted or predicted) + [N] next tokens -> the step's input rows."""
        ...

    def step(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        store: Any = None,
        offset: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One draft step over rows ``x`` at ``positions``: [N, H] predicted states. ``store`` (from
        ``begin``) holds earlier rows' K/V, written at ``offset`` past its committed length;
        ``mask`` [N, length + offset + N] says which of those rows and of ``x`` each row sees."""
        ...

    def begin(self, max_len: int) -> Any:
        """A fresh KV store for ``step`` holding up to ``max_len`` rows."""
        ...


@runtime_checkable
class TrainableBlock(Protocol):
    """A drafter that drafts every depth in one forward (parallel/block drafting): trained with
    each anchor row's depth rows appended, all depths scored in one forward."""

    block_depths: int  # depths per forward: the context row gives depth 1, depth row j depth j + 1

    def lift(self, features: torch.Tensor) -> torch.Tensor:
        """[N, F] target features (``feature_layers`` concatenated) -> [N, H] state."""
        ...

    def context_input(self, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[N, H] state + [N] next tokens -> [N, W] context rows."""
        ...

    def depth_input(self) -> torch.Tensor:
        """[block_depths - 1, W] the rows appended after an anchor for depths 2 .. block_depths."""
        ...

    def step(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        store: Any = None,
        offset: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The drafter's layer over rows ``x`` at ``positions`` with attention ``mask``: [N, H]."""
        ...


def read_drafter_config(directory: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a saved drafter, with errors that say what to fix."""
    if not directory.is_dir():
        raise FileNotFoundError(
            f"drafter directory {directory} does not exist; pass a directory written by save_pretrained"
        )
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; a drafter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); the drafter files are corrupt, save or download them again"
        ) from e
    if not isinstance(meta, dict) or "kind" not in meta:
        raise ValueError(f"{path} has no 'kind' field; it is not a selfspec drafter config")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {meta['format_version']}; upgrade selfspec to load it")
    for old, new in RENAMED_KEYS.items():
        if old in meta and new not in meta:
            meta[new] = meta.pop(old)
    return meta


def check_compatible(meta: dict[str, Any], model: nn.Module, where: Path) -> None:
    """Refuse a drafter built for another target, naming both values."""
    fp = target_fingerprint(model)
    for key in ("hidden_size", "vocab_size", "target_architecture"):
        want = meta.get(key)
        if want in (None, "") or want == fp[key]:
            continue
        raise ValueError(
            f"drafter at {where} was made for {key}={want!r} but the target has {key}={fp[key]!r}; "
            "use a drafter trained for this target (selfspec train) or load the matching target"
        )


def load_weights(drafter: Drafter, directory: Path) -> None:
    """Load ``model.safetensors`` into ``drafter``; every tensor must be present and fit."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; a drafter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{path} cannot be read ({e}); the drafter weights are corrupt, save or download them again"
        ) from e
    try:
        drafter.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not match the drafter described by its config.json: {e}") from e
    if drafter.draft_ids is not None:
        drafter.set_draft_vocab(drafter.draft_ids.clone())
    if (directory / ADAPTER_CONFIG_NAME).is_file():
        drafter.load_vocab_lora(directory)
