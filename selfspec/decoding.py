"""The decode loop: prefill, then draft -> verify in one target pass -> accept -> commit.

Each step the drafter proposes a token tree rooted at the last bonus token; the target scores
every node in one forward (tree attention over the KV cache); the longest path the target agrees
with is kept together with the target's own next token; the accepted K/V rows are moved into
place; and the target hidden states of the accepted path feed the next proposal (no extra target
pass). With ``drafter=None`` each step is a one-node tree, i.e. plain greedy decoding through the
same engine: the fair baseline.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from selfspec.accept import Acceptance, greedy_accept, sample_accept, typical_accept
from selfspec.drafters import Draft, Drafter
from selfspec.hf import (
    VERIFY,
    StoreCache,
    TreeMask,
    attention_backend,
    check_supported,
    new_store,
    row_exact,
    selfspec_attention,
    target_forward,
)
from selfspec.lookup import Lookup, merged_tree
from selfspec.sampling import CandidateSampler, LogitsProcessor, SamplingConfig, sample_tokens, warp_logits
from selfspec.tree import DynamicTree, TreeBuffers, chain, tree_from_parents

ACCEPTANCE = ("exact", "typical")
CANDIDATES = ("auto", "top-k", "sampled")

ROOT_ONLY = chain(0)


@dataclass
class Stats:
    """What one ``generate`` call did. tau counts the bonus token: a step that keeps k drafted
    tokens produces k + 1 tokens."""

    new_tokens: int = 0
    steps: int = 0  # verify forwards after the prefill
    mean_accepted_length: float = 0.0  # tau: tokens produced per verify step
    accepted_hist: list[int] = field(default_factory=list)  # [k] = steps that produced k tokens
    accepted_by_depth: list[float] = field(default_factory=list)  # [d-1] = share of steps keeping depth d
    tree_nodes: int = 1
    prefill_s: float = 0.0  # time to first token
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    draft_s: float = 0.0  # time in drafter.propose, over all steps
    verify_s: float = 0.0  # time in the target's verify forwards (after the prefill)
    accept_s: float = 0.0  # acceptance rule + KV commit
    lookup_proposed: int = 0  # drafted nodes that came from lookup branches (selfspec.lookup)
    lookup_accepted: int = 0  # of those, tokens the target kept

    def record_step(self, produced: int) -> None:
        self.steps += 1
        while len(self.accepted_hist) <= produced:
            self.accepted_hist.append(0)
        self.accepted_hist[produced] += 1

    def finish(self, new_tokens: int, wall_s: float, max_depth: int) -> None:
        self.new_tokens, self.wall_s = new_tokens, wall_s
        produced = sum(k * n for k, n in enumerate(self.accepted_hist))
        self.mean_accepted_length = produced / self.steps if self.steps else 0.0
        self.tokens_per_s = new_tokens / wall_s if wall_s > 0 else 0.0
        reached = [sum(self.accepted_hist[d + 1 :]) for d in range(1, max_depth + 1)]
        self.accepted_by_depth = [r / self.steps if self.steps else 0.0 for r in reached]


@dataclass
class GenerationResult:
    sequences: torch.Tensor  # [1, prompt + new] int64
    stats: Stats


@dataclass(frozen=True)
class Decoding:
    """How each step turns target logits into accepted tokens (one object for the whole loop)."""

    sampling: SamplingConfig
    acceptance: str = "exact"  # "exact" (lossless) or "typical" (Medusa's, lossy)
    logits_processor: LogitsProcessor | None = None
    generator: torch.Generator | None = None
    exact_verify: bool = True  # TreeMask.exact: per-node bitwise verification (selfspec.hf.VERIFY)
    candidates: str = "top-k"  # "top-k" or "sampled" (drawn from the drafter's warped distribution)

    @property
    def sampler(self) -> CandidateSampler | None:
        """How the drafter draws sampled candidates; None for top-k candidates."""
        if self.candidates != "sampled":
            return None
        return CandidateSampler(self.sampling, self.generator)

    @property
    def plain_greedy(self) -> bool:
        return self.sampling.greedy and self.acceptance == "exact" and self.logits_processor is None

    def first_token(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The token after the prompt from its last logits [V]; returns [1]."""
        if self.plain_greedy:
            return logits.argmax()[None]
        probs = warp_logits(logits[None], self.sampling, self.logits_processor, ids[None])
        return sample_tokens(probs, self.generator)

    def accept(self, logits: torch.Tensor, draft: Draft, committed: torch.Tensor) -> Acceptance:
        """logits [T, V] at every node; committed [L] the tokens before the root."""
        if self.plain_greedy:
            return greedy_accept(logits, draft.tokens, draft.tree)
        if self.acceptance == "typical":
            return typical_accept(
                logits, draft.tokens, draft.tree, self.sampling.temperature, generator=self.generator
            )
        probs = _warp_tree(logits, draft, committed, self)
        return sample_accept(probs, draft.tokens, draft.tree, draft.probs, self.generator)


def _warp_tree(logits: torch.Tensor, draft: Draft, committed: torch.Tensor, dec: Decoding) -> torch.Tensor:
    """Warped target distribution at every node [T, V]. A logits processor sees each node's own
    context (committed tokens + the node's path), one call per depth (equal lengths)."""
    if dec.logits_processor is None:
        return warp_logits(logits, dec.sampling)
    tree, probs = draft.tree, torch.empty_like(logits, dtype=torch.float32)
    paths = torch.where(tree.ancestor_mask, draft.tokens[None, :], -1)  # [T, T] path tokens, -1 elsewhere
    for d in range(tree.max_depth + 1):
        nodes = (tree.depths == d).nonzero().flatten()
        context = paths[nodes][paths[nodes] >= 0].view(nodes.numel(), d + 1)  # [n_d, d+1] root..node
        ids = torch.cat([committed.expand(nodes.numel(), -1), context], 1)
        probs[nodes] = warp_logits(logits[nodes], dec.sampling, dec.logits_processor, ids)
    return probs


def eos_ids(
    model: PreTrainedModel, eos_token_id: int | Iterable[int] | None = None, fallback: int | None = None
) -> set[int]:
    """The tokens that end a reply: ``eos_token_id`` when given, else the model's generation config's,
    else ``fallback`` (a tokenizer's eos token); empty when there is none. Decoding, distillation and
    self-written prompts all stop on this set."""
    eos = eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id
    eos = eos if eos is not None else fallback
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def _prompt(input_ids: torch.Tensor | list[int]) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.ndim == 2:
        if ids.shape[0] != 1:
            raise ValueError(
                f"input_ids has batch size {ids.shape[0]}; selfspec.generate decodes one sequence "
                "per call (shape [1, n] or [n])"
            )
        ids = ids[0]
    if ids.ndim != 1 or ids.numel() == 0:
        raise ValueError(
            f"input_ids must be a non-empty [n] or [1, n] tensor of token ids, got shape {tuple(ids.shape)}"
        )
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    return ids.long()


def check_lengths(model: PreTrainedModel, prompt_len: int, max_new_tokens: int) -> None:
    """Raise before any work when the request cannot fit the model's context."""
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if context and prompt_len + max_new_tokens > context:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model "
            f"context of {context} tokens; shorten the prompt or lower max_new_tokens"
        )


def _stream(streamer: Any, tokens: torch.Tensor) -> None:
    if streamer is not None:
        streamer.put(tokens.cpu())


TreeArg = TreeBuffers | DynamicTree | str | int | None


def resolve_tree(
    tree: TreeArg, drafter: Drafter | None, model: PreTrainedModel, verify: str = "exact"
) -> TreeBuffers | DynamicTree:
    """None/"static": the drafter's (calibrated) static tree; "dynamic": a per-step tree of the
    default budget; an int N: dynamic with N nodes; "auto": the budget measured fastest here."""
    if drafter is None:
        return ROOT_ONLY  # one token per step: nothing is drafted
    if tree is None or tree == "static":
        return drafter.tree
    if isinstance(tree, (TreeBuffers, DynamicTree)):
        return tree
    if tree == "dynamic":
        return DynamicTree()
    if tree == "auto":
        from selfspec.autotune import auto_tree

        return auto_tree(model, drafter, verify=verify)
    if isinstance(tree, int) and not isinstance(tree, bool):
        if tree < 1:
            raise ValueError(f"tree size must be >= 1 node, got {tree}")
        return ROOT_ONLY if tree == 1 else DynamicTree.sized(tree)
    raise ValueError(
        f"tree={tree!r} is not understood; pass 'static', 'dynamic', 'auto', a node count, "
        "or a TreeBuffers / DynamicTree"
    )


def _tree_rows(tree: TreeBuffers | DynamicTree) -> int:
    """Scratch cache rows one step may write past the committed ones."""
    return tree.pool_size if isinstance(tree, DynamicTree) else tree.size


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    drafter: Drafter | None = None,
    max_new_tokens: int = 128,
    eos_token_id: int | Iterable[int] | None = None,
    streamer: Any = None,
    tree: TreeArg = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    logits_processor: LogitsProcessor | None = None,
    acceptance: str = "exact",
    verify: str = "exact",
    lookup: Lookup | bool | None = None,
    candidates: str = "auto",
) -> GenerationResult:
    """Speculative decoding. Greedy output equals ``model.generate(do_sample=False)``; with
    ``temperature > 0`` the output follows the target's (warped) distribution exactly.

    input_ids: [1, n] or [n]. drafter: None decodes one token per step through the same engine.
    tree: "static" (default: the drafter's own tree), "dynamic", a node budget (dynamic), "auto",
    or a TreeBuffers / DynamicTree. temperature/top_k/top_p: warping applied identically to the
    target and the drafter; seed: reproducible sampling; logits_processor: a transformers
    ``LogitsProcessorList`` (or any ``(input_ids, scores) -> scores``) applied to every node with
    its own context. acceptance: "exact" (lossless) or "typical" (Medusa's typical acceptance,
    faster but lossy: the output no longer follows the target's distribution exactly).
    streamer: a transformers streamer; it receives the prompt first, as with HF generate.
    verify: "exact" (every tree node computes bitwise what a one-token step computes, so greedy
    output is bitwise ``model.generate``'s in any dtype) or "batched" (one masked pass, cheaper on
    a CPU, exact only up to floating-point near-ties); see ``selfspec.hf.VERIFY``.
    lookup: True (default settings) or a ``selfspec.lookup.Lookup`` adds branches copied from the
    context (n-gram matches in the prompt and the generated text) to every step's tree, within the
    tree's node budget; with ``drafter=None`` it speculates with no trained drafter at all.
    candidates (temperature > 0): "top-k" (the drafter's most likely tokens), "sampled" (drawn
    from the drafter's warped distribution, siblings without replacement; the rejection rule uses
    what they were drawn from) or "auto" (the one measured better at this temperature,
    ``resolve_candidates``). Both are lossless; they differ in how many tokens a step keeps.
    """
    if acceptance not in ACCEPTANCE:
        raise ValueError(f"acceptance must be one of {ACCEPTANCE}, got {acceptance!r}")
    if verify not in VERIFY:
        raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")
    check_supported(model)  # a model loaded without load_target: its attention must take the tree
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    prompt = _prompt(input_ids).to(model.device)
    check_lengths(model, prompt.numel(), max_new_tokens)
    lookup = _lookup_arg(lookup)
    tree = resolve_tree(tree, drafter, model, verify)
    tree = tree.to(model.device) if isinstance(tree, TreeBuffers) else tree
    dec = Decoding(
        sampling,
        acceptance,
        logits_processor,
        sampling.make_generator(model.device),
        verify == "exact",
        resolve_candidates(candidates, sampling, acceptance),
    )
    if verify == "exact":  # measures the linear plans once per process, before the clock starts
        row_exact(model)
    eos = eos_ids(model, eos_token_id)
    return _run(model, prompt, drafter, tree, max_new_tokens, eos, streamer, dec, lookup)


# "auto" uses sampled candidates above this temperature, top-k at or below it. Measured with the
# shipped drafter on development prompts from the training files, never the eval sets
# (benchmarks/bench_candidates.py; benchmarks/README.md, session 6): at 0.5 neither won (tau 1.06x
# static, 0.98x dynamic, speed 1.00x / 0.97x); at 1.0 sampled kept 10% / 7% more tokens per step
# and ran 1.05x / 1.02x. Temperatures in between were not measured.
SAMPLED_FROM_TEMPERATURE = 0.5


def resolve_candidates(candidates: str, sampling: SamplingConfig, acceptance: str = "exact") -> str:
    """ "top-k" or "sampled" for a ``generate(candidates=...)`` value. Greedy decoding always uses
    top-k (a sampled draw from a point mass is its argmax); typical acceptance reads no proposal
    distribution, so it refuses "sampled"."""
    if candidates not in CANDIDATES:
        raise ValueError(f"candidates must be one of {CANDIDATES}, got {candidates!r}")
    if candidates == "sampled" and acceptance != "exact":
        raise ValueError(
            "candidates='sampled' needs acceptance='exact' (typical acceptance does not use the "
            "distribution the candidates were drawn from); pass candidates='top-k' or 'auto'"
        )
    if sampling.greedy or acceptance != "exact":
        return "top-k"
    if candidates == "auto":
        return "sampled" if sampling.temperature > SAMPLED_FROM_TEMPERATURE else "top-k"
    return candidates


def _lookup_arg(lookup: Lookup | bool | None) -> Lookup | None:
    if lookup is None or lookup is False:
        return None
    if lookup is True:
        return Lookup()
    if isinstance(lookup, Lookup):
        return lookup.fresh()  # state is per call; the caller's object only carries settings
    raise ValueError(f"lookup must be True, False, None or a selfspec.lookup.Lookup, got {lookup!r}")


def _run(model, prompt, drafter, tree, max_new_tokens, eos, streamer, dec, lookup=None) -> GenerationResult:
    start = time.perf_counter()
    if isinstance(tree, TreeBuffers) and tree.size == 1:
        drafter = None  # a root-only tree drafts nothing (tree="auto" picks it where drafting does not pay)
    stats = Stats(tree_nodes=tree.budget if isinstance(tree, DynamicTree) else tree.size)
    _stream(streamer, prompt[None])
    max_len = prompt.numel() + max_new_tokens + _tree_rows(tree) + (lookup.max_nodes if lookup else 0)
    with selfspec_attention(model):
        cache = StoreCache(new_store(model, max_len))
        state = drafter.begin(max_len) if drafter is not None else None
        first = target_forward(
            model, cache, prompt, feature_layers=feature_layers(drafter), last_logits_only=True
        )
        cache.store.commit(torch.arange(prompt.numel()))
        token = dec.first_token(first.logits[-1], prompt)  # [1]
        stats.prefill_s = time.perf_counter() - start
        if lookup is not None:
            lookup.begin(prompt.tolist() + token.tolist())
        loop = _Loop(model, cache, drafter, state, tree, dec, prompt, lookup)
        out = loop.run(first.hidden, torch.cat([prompt[1:], token]), max_new_tokens, eos, streamer, stats)
    if streamer is not None:
        streamer.end()
    depth = tree.depth if isinstance(tree, DynamicTree) else tree.max_depth
    if lookup is not None:
        depth = max(depth, lookup.max_len)
        stats.lookup_proposed, stats.lookup_accepted = lookup.proposed_nodes, lookup.accepted_tokens
    stats.finish(out.numel(), time.perf_counter() - start, depth)
    return GenerationResult(sequences=torch.cat([prompt, out])[None], stats=stats)


def feature_layers(drafter: Drafter | None) -> tuple[int, ...]:
    """The target hidden states a drafter reads (the last one unless it fuses several)."""
    return drafter.feature_layers if drafter is not None else (-1,)


def _truncate(new: list[int], room: int, eos: set[int]) -> tuple[list[int], bool]:
    """Cut ``new`` at the first EOS (kept) or at ``room`` tokens; say whether decoding is done."""
    for i, t in enumerate(new[:room]):
        if t in eos:
            return new[: i + 1], True
    return new[:room], len(new) >= room


@dataclass
class _Loop:
    """The step loop after prefill."""

    model: PreTrainedModel
    cache: StoreCache
    drafter: Drafter | None
    state: Any
    tree: TreeBuffers | DynamicTree
    dec: Decoding
    prompt: torch.Tensor  # [n]
    lookup: Lookup | None = None
    _pruned: dict = field(default_factory=dict)  # drafter trees cut to a smaller budget, by size

    def run(self, hidden, next_tokens, max_new_tokens, eos, streamer, stats) -> torch.Tensor:
        """hidden [n, H] / next_tokens [n]: the newly committed positions. Returns new tokens [m]."""
        backend = attention_backend(self.model.device)
        produced: list[int] = []
        new = next_tokens[-1:].tolist()
        while True:
            new, done = _truncate(new, max_new_tokens - len(produced), eos)
            produced += new
            _stream(streamer, torch.tensor(new))
            if done:
                return torch.tensor(produced, device=self.model.device)
            next_tokens, hidden = self.step(hidden, next_tokens, produced, backend, stats)
            new = next_tokens.tolist()
            stats.record_step(len(new))

    def step(self, hidden, next_tokens, produced, backend, stats):
        """Draft, verify in one forward, accept, commit. Returns the kept tokens + bonus [k] and
        the target's hidden state at each kept node [k, H]."""
        t0 = time.perf_counter()
        branches = self.lookup.propose() if self.lookup is not None else []
        drafted = sum(len(b) for b in branches)
        if self.drafter is not None:
            tree = self._drafter_tree(drafted)
            draft = self.drafter.propose(self.state, hidden, next_tokens, tree, sampler=self.dec.sampler)
        else:
            draft = Draft(tree=self.tree, tokens=next_tokens[-1:])
        if branches:
            draft = Draft(*merged_tree(draft.tree, draft.tokens, branches, draft.probs))
        t1 = time.perf_counter()
        mask = (
            TreeMask(draft.tree.ancestor_mask, backend, self.dec.exact_verify)
            if draft.tree.size > 1
            else None
        )
        out = target_forward(
            self.model, self.cache, draft.tokens, draft.tree.depths, mask, feature_layers(self.drafter)
        )
        t2 = time.perf_counter()
        committed = None
        if not self.dec.plain_greedy and self.dec.logits_processor is not None:
            committed = torch.cat(
                [self.prompt, torch.tensor(produced[:-1], dtype=torch.long, device=self.prompt.device)]
            )
        acc = self.dec.accept(out.logits, draft, committed)
        self.cache.store.commit(acc.path)
        kept = torch.cat([draft.tokens[acc.path[1:]], acc.bonus.reshape(1)])  # drafted kept + bonus
        if self.lookup is not None:
            self.lookup.update(kept.tolist())
        stats.draft_s += t1 - t0
        stats.verify_s += t2 - t1
        stats.accept_s += time.perf_counter() - t2
        return kept, out.hidden[acc.path]

    def _budget(self) -> int:
        return self.tree.budget if isinstance(self.tree, DynamicTree) else self.tree.size

    def _drafter_tree(self, lookup_nodes: int) -> TreeBuffers | DynamicTree:
        """The drafter's tree with its budget less the nodes the lookup took, so both sources
        share one node budget, split by what the lookup drafted (the nodes it estimates are kept
        often enough, ``Lookup.threshold``); the drafter keeps at least half of it (and 2
        nodes). A static tree keeps its first nodes (by depth, then rank); a dynamic tree
        selects fewer."""
        budget = self._budget()
        keep = max(budget - lookup_nodes, min(budget, max(2, (budget + 1) // 2)))
        if keep == budget:
            return self.tree
        if isinstance(self.tree, DynamicTree):
            return dataclasses.replace(self.tree, budget=keep)
        if keep not in self._pruned:
            t = self.tree
            self._pruned[keep] = tree_from_parents(t.parents[:keep], t.ranks[:keep])
        return self._pruned[keep]
