"""Logits warping shared by the target and the drafter.

Lossless speculative sampling reproduces the distribution the target would sample from on its
own, so "the target's distribution" must mean the *warped* one: an optional logits-processor hook
(repetition penalty, banned tokens, ...), then temperature, then top-k, then top-p, then a softmax
in fp32. The drafter's candidates are drawn from (or ranked by) the same warping of its own
logits; the acceptance rule only needs both as probability vectors.

Temperature 0 means greedy: the warped distribution is a point mass on the argmax (first index on
ties, as ``torch.argmax``), so sampling acceptance with deterministic candidates then reduces to
exact greedy acceptance.

Everything is vectorized over leading dimensions: one call warps the logits of every tree node.
torch only; no models, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# (input_ids, scores [N, V]) -> scores [N, V]; a transformers LogitsProcessorList fits this.
LogitsProcessor = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SamplingConfig:
    """How to turn logits into the distribution the next token is drawn from."""

    temperature: float = field(default=0.0, metadata={"help": "softmax temperature; 0 means greedy decoding"})
    top_k: int = field(
        default=0, metadata={"help": "keep only the k most likely tokens (ties kept); 0 turns it off"}
    )
    top_p: float = field(
        default=1.0,
        metadata={
            "help": "keep the smallest set of most likely tokens holding this much mass; 1 turns it off"
        },
    )
    seed: int | None = field(
        default=None, metadata={"help": "seed of the sampling generator; None draws from torch's global RNG"}
    )

    def __post_init__(self):
        if not (
            isinstance(self.temperature, (int, float))
            and math.isfinite(self.temperature)
            and self.temperature >= 0
        ):
            raise ValueError(
                f"temperature must be a finite number >= 0, got {self.temperature!r}; "
                "pass 0 for greedy decoding or a positive value (e.g. 0.7) to sample"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(
                f"top_k must be an integer >= 0, got {self.top_k!r}; pass 0 to turn top-k filtering off"
            )
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(
                f"top_p must be in (0, 1], got {self.top_p!r}; pass 1.0 to turn nucleus filtering off "
                "or e.g. 0.9 to keep the most likely tokens holding 90% of the mass"
            )
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """True when decoding is greedy (temperature 0); top-k and top-p then have no effect."""
        return self.temperature == 0

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A fresh generator on ``device`` seeded with ``seed``; None (torch's global RNG) without a seed."""
        if self.seed is None:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed)
        return generator


def warp_logits(
    logits: torch.Tensor,
    config: SamplingConfig,
    logits_processor: LogitsProcessor | None = None,
    input_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Probabilities [..., V] (fp32) of the next token under ``config``, for logits [..., V].

    ``logits_processor(input_ids, scores)`` runs first, on scores flattened to [N, V]; ``input_ids``
    is passed through untouched, so it must hold one row per flattened row of ``logits`` (e.g. the
    prefix plus ancestors of every tree node) when the processor reads it.
    """
    scores = logits.float()
    if logits_processor is not None:
        flat = scores.reshape(-1, scores.shape[-1])  # [N, V]
        scores = logits_processor(input_ids, flat).reshape(scores.shape).float()
    if config.greedy:
        return torch.nn.functional.one_hot(scores.argmax(-1), scores.shape[-1]).float()
    scores = scores / config.temperature
    if config.top_k > 0:
        scores = _top_k_filter(scores, config.top_k)
    if config.top_p < 1:
        scores = _top_p_filter(scores, config.top_p)
    return scores.softmax(-1)


@dataclass(frozen=True)
class CandidateSampler:
    """How a drafter draws sampled candidates: the target's warping of its logits and the decode
    call's generator. The logits processor is left out on purpose: the rejection rule is lossless
    for any proposal distribution, as long as it is the one the candidate was drawn from."""

    config: SamplingConfig
    generator: torch.Generator | None = None

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The warped distribution [..., V] (fp32) candidates are drawn from."""
        return warp_logits(logits, self.config)


def sample_tokens(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token [...] drawn from each distribution in probs [..., V]."""
    flat = probs.reshape(-1, probs.shape[-1])  # [N, V]
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def _top_k_filter(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Scores [..., V] with everything below the k-th largest set to -inf (ties with it are kept,
    so the result never depends on how a sort breaks ties)."""
    kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]  # [..., 1]
    return scores.masked_fill(scores < kth, -math.inf)


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Scores [..., V] keeping the smallest prefix of most likely tokens whose mass reaches top_p."""
    sorted_scores, order = scores.sort(dim=-1, descending=True, stable=True)  # [..., V]
    probs = sorted_scores.softmax(-1)
    # A token is dropped when the more likely tokens before it already hold top_p; the most
    # likely token has zero mass before it, so at least one token always survives.
    drop_sorted = (probs.cumsum(-1) - probs) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, -math.inf)
