"""The decode loop: prefill, then draft -> verify in one target pass -> accept -> commit.

Each step the drafter proposes a token tree rooted at the last bonus token; the target scores
every node in one forward (tree attention over the KV cache); the longest path the target agrees
with is kept together with the target's own next token; the accepted K/V rows are moved into
place; and the target hidden states of the accepted path feed the next proposal (no extra target
pass). With ``drafter=None`` each step is a one-node tree, i.e. plain greedy decoding through the
same engine: the fair baseline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from transformers import PreTrainedModel

from selfspec.accept import greedy_accept
from selfspec.drafters import Draft, Drafter
from selfspec.hf import StoreCache, TreeMask, attention_backend, new_store, selfspec_attention, sliding_window
from selfspec.hf import target_forward
from selfspec.tree import TreeBuffers, chain

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


def _eos_set(model: PreTrainedModel, eos_token_id: int | Iterable[int] | None) -> set[int]:
    eos = eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def _prompt(input_ids: torch.Tensor | list[int]) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.ndim == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"input_ids has batch size {ids.shape[0]}; selfspec.generate decodes one sequence "
                             "per call (shape [1, n] or [n])")
        ids = ids[0]
    if ids.ndim != 1 or ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty [n] or [1, n] tensor of token ids, got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    return ids.long()


def check_lengths(model: PreTrainedModel, prompt_len: int, max_new_tokens: int, tree_size: int) -> None:
    """Raise before any work when the request cannot fit the model's context."""
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if context and prompt_len + max_new_tokens > context:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model "
                         f"context of {context} tokens; shorten the prompt or lower max_new_tokens")
    window = sliding_window(model)
    if window and prompt_len + max_new_tokens + tree_size > window:
        raise ValueError(f"the model uses a sliding attention window of {window} tokens, which tree verification "
                         f"does not implement; keep prompt + max_new_tokens under {window - tree_size}")


def _stream(streamer: Any, tokens: torch.Tensor) -> None:
    if streamer is not None:
        streamer.put(tokens.cpu())


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    drafter: Drafter | None = None,
    max_new_tokens: int = 128,
    eos_token_id: int | Iterable[int] | None = None,
    streamer: Any = None,
    tree: TreeBuffers | None = None,
) -> GenerationResult:
    """Greedy speculative decoding; the output equals ``model.generate(do_sample=False)``.

    input_ids: [1, n] or [n]. drafter: None decodes one token per step through the same engine.
    tree: the static draft tree (default: the drafter's own). streamer: a transformers streamer
    (``TextStreamer``/``TextIteratorStreamer``); it receives the prompt first, as with HF generate.
    """
    prompt = _prompt(input_ids).to(model.device)
    if drafter is None:
        tree = ROOT_ONLY  # one token per step: nothing is drafted
    tree = (tree if tree is not None else drafter.tree).to(model.device)
    check_lengths(model, prompt.numel(), max_new_tokens, tree.size)
    eos = _eos_set(model, eos_token_id)
    start = time.perf_counter()
    stats = Stats(tree_nodes=tree.size)
    _stream(streamer, prompt[None])
    max_len = prompt.numel() + max_new_tokens + tree.size
    with selfspec_attention(model):
        cache = StoreCache(new_store(model, max_len))
        state = drafter.begin(max_len) if drafter is not None else None
        first = target_forward(model, cache, prompt)
        cache.store.commit(torch.arange(prompt.numel()))
        token = first.logits[-1].argmax()[None]  # [1]
        stats.prefill_s = time.perf_counter() - start
        out = _decode(model, cache, drafter, state, tree, first.hidden, torch.cat([prompt[1:], token]),
                      max_new_tokens, eos, streamer, stats)
    if streamer is not None:
        streamer.end()
    stats.finish(out.numel(), time.perf_counter() - start, tree.max_depth)
    return GenerationResult(sequences=torch.cat([prompt, out])[None], stats=stats)


def _truncate(new: list[int], room: int, eos: set[int]) -> tuple[list[int], bool]:
    """Cut ``new`` at the first EOS (kept) or at ``room`` tokens; say whether decoding is done."""
    for i, t in enumerate(new[:room]):
        if t in eos:
            return new[: i + 1], True
    return new[:room], len(new) >= room


def _decode(model, cache, drafter, state, tree, hidden, next_tokens, max_new_tokens, eos, streamer, stats):
    """The step loop after prefill. hidden [n, H] / next_tokens [n]: newly committed positions."""
    backend = attention_backend(model.device)
    produced: list[int] = []
    new = next_tokens[-1:].tolist()
    while True:
        new, done = _truncate(new, max_new_tokens - len(produced), eos)
        produced += new
        _stream(streamer, torch.tensor(new))
        if done:
            return torch.tensor(produced, device=model.device)
        if drafter is not None:
            draft = drafter.propose(state, hidden, next_tokens, tree)
        else:
            draft = Draft(tree=tree, tokens=next_tokens[-1:])
        mask = TreeMask(draft.tree.ancestor_mask, backend) if draft.tree.size > 1 else None
        out = target_forward(model, cache, draft.tokens, draft.tree.depths, mask)
        acc = greedy_accept(out.logits, draft.tokens, draft.tree)
        cache.store.commit(acc.path)
        next_tokens = torch.cat([draft.tokens[acc.path[1:]], acc.bonus[None]])  # [n] drafted kept + bonus
        hidden = out.hidden[acc.path]  # [n, H]: the target's state at each kept node
        new = next_tokens.tolist()
        stats.record_step(len(new))
