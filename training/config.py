"""Every setting of ``selfspec train``, one dataclass per stage: the fields are also the command's
flags (generated in ``selfspec.training.cli``: one name, one default, one help text and one
validation each). Light to import, no torch, so ``selfspec train --help`` loads nothing heavy; the
stages (``data``, ``distill``, ``features``, ``trainer``, ``calibrate``, ``pipeline``) import their
config from here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfspec.options import DRAFTER_KINDS

FORMATS = ("sharegpt", "openai", "alpaca", "gsm8k", "prompt")  # row shapes of training data
FEATURE_DTYPES = ("float16", "bfloat16", "float32")  # storage dtypes of captured features
SAVE_DTYPES = ("float16", "bfloat16", "float32")  # stored weight dtypes of a trained drafter
DATA_DTYPES = ("float32", "bfloat16", "float16")  # target dtypes of the data stages
EXPORT_FORMATS = ("eagle", "eagle3", "medusa")  # checkpoint layouts `selfspec export` writes
ENGINES = ("vllm", "sglang")  # serving engines whose config naming export follows


@dataclass
class DataConfig:
    sources: list[str] = dataclasses.field(
        default_factory=list,
        metadata={
            "help": "local .json/.jsonl/.txt files or Hugging Face dataset names (NAME or NAME:CONFIG)"
        },
    )
    format: str = dataclasses.field(
        default="auto", metadata={"help": f"row shape: auto or one of {', '.join(FORMATS)}"}
    )
    split: str = dataclasses.field(default="train", metadata={"help": "dataset split to read (hub datasets)"})
    max_per_source: int = dataclasses.field(
        default=0,
        metadata={"help": "use at most this many rows of each source (a seeded random sample); 0 = all"},
    )
    cache_dir: str | None = dataclasses.field(
        default=None, metadata={"help": "datasets cache directory (default: the datasets library's own)"}
    )
    self_prompts: int = dataclasses.field(
        default=0,
        metadata={
            "help": "also let the target write this many prompts itself, after its chat "
            "template's user-turn header (Magpie-style; with or without --data)"
        },
    )

    def __post_init__(self):
        if self.format != "auto" and self.format not in FORMATS:
            raise ValueError(f"unknown data format {self.format!r}; use auto or one of {', '.join(FORMATS)}")
        if self.max_per_source < 0:
            raise ValueError(f"max_per_source must be >= 0 (0 = all rows), got {self.max_per_source}")
        if self.self_prompts < 0:
            raise ValueError(f"self_prompts must be >= 0 (0 = none), got {self.self_prompts}")


@dataclass
class DistillConfig:
    max_new_tokens: int = dataclasses.field(default=256, metadata={"help": "longest response generated"})
    batch_size: int = dataclasses.field(default=16, metadata={"help": "prompts decoded together"})
    temperature: float = dataclasses.field(
        default=0.0, metadata={"help": "0 = greedy responses; > 0 samples"}
    )
    top_p: float = dataclasses.field(default=1.0, metadata={"help": "nucleus filter when sampling"})
    max_prompt_tokens: int = dataclasses.field(
        default=1024, metadata={"help": "longer prompts are skipped (counted)"}
    )
    use_original: bool = dataclasses.field(
        default=False,
        metadata={"help": "train on the dataset's own replies instead of the target's (not recommended)"},
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of sampled responses (per batch)"})
    check: int = dataclasses.field(
        default=8,
        metadata={
            "help": "regenerate this many new greedy replies one prompt at a time and report how many "
            "the batched decoding reproduced (0 = no check)"
        },
    )

    def __post_init__(self):
        for name in ("max_new_tokens", "batch_size", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"distill {name} must be >= 1, got {getattr(self, name)}")
        if self.check < 0:
            raise ValueError(f"distill check must be >= 0 (0 = no check), got {self.check}")
        from selfspec.sampling import SamplingConfig  # torch; only when settings are built

        SamplingConfig(temperature=self.temperature, top_p=self.top_p)  # same checks and messages


@dataclass
class FeatureConfig:
    max_tokens: int = dataclasses.field(
        default=4_000_000,
        metadata={"help": "stop capturing after this many tokens (bounds the cache on disk)"},
    )
    max_seq_len: int = dataclasses.field(default=2048, metadata={"help": "longer sequences are truncated"})
    batch_tokens: int = dataclasses.field(default=4096, metadata={"help": "padded tokens per target forward"})
    dtype: str = dataclasses.field(
        default="float16", metadata={"help": f"storage dtype: {', '.join(FEATURE_DTYPES)}"}
    )
    feature_layers: list[int] = dataclasses.field(
        default_factory=list,
        metadata={
            "help": "target hidden states stored besides the last (0 = embeddings); an eagle3 "
            "drafter's feature layers are added automatically"
        },
    )
    shard_tokens: int = dataclasses.field(default=262_144, metadata={"help": "tokens per shard file"})

    def __post_init__(self):
        if self.dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature dtype must be one of {', '.join(FEATURE_DTYPES)}, got {self.dtype!r}")
        for name in ("max_tokens", "max_seq_len", "batch_tokens", "shard_tokens"):
            if getattr(self, name) < 2:
                raise ValueError(f"features {name} must be >= 2, got {getattr(self, name)}")


@dataclass
class TrainConfig:
    kind: str = dataclasses.field(
        default="eagle", metadata={"help": f"drafter kind: {', '.join(sorted(DRAFTER_KINDS))}"}
    )
    steps: int = dataclasses.field(default=2000, metadata={"help": "optimizer steps"})
    batch_tokens: int = dataclasses.field(
        default=2048, metadata={"help": "rows per micro-batch (sequences packed)"}
    )
    grad_accum: int = dataclasses.field(
        default=1, metadata={"help": "micro-batches per optimizer step and process"}
    )
    lr: float = dataclasses.field(default=5e-4, metadata={"help": "peak learning rate (AdamW)"})
    min_lr_ratio: float = dataclasses.field(default=0.1, metadata={"help": "cosine decay ends at lr * this"})
    warmup_steps: int = dataclasses.field(default=50, metadata={"help": "linear warm-up steps"})
    weight_decay: float = dataclasses.field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = dataclasses.field(
        default=1.0, metadata={"help": "clip the gradient norm to this (0 = off)"}
    )
    seed: int = dataclasses.field(
        default=0, metadata={"help": "seed of initialisation, data order and noise"}
    )
    medusa_heads: int = dataclasses.field(default=4, metadata={"help": "Medusa: heads (tree depth)"})
    medusa_layers: int = dataclasses.field(default=1, metadata={"help": "Medusa: residual blocks per head"})
    head_decay: float = dataclasses.field(
        default=0.8, metadata={"help": "Medusa: head k's loss weight is decay**k"}
    )
    unroll: int = dataclasses.field(
        default=2, metadata={"help": "EAGLE: training-time-test steps (1 = teacher forcing)"}
    )
    step_decay: float = dataclasses.field(
        default=0.8,
        metadata={"help": "EAGLE: unrolled step i's loss weight is decay**i (block: depth i's)"},
    )
    block_depths: int = dataclasses.field(
        default=4, metadata={"help": "block: depths drafted by one forward (the deepest tree level)"}
    )
    feature_weight: float = dataclasses.field(
        default=1.0, metadata={"help": "EAGLE: weight of the feature regression"}
    )
    token_weight: float = dataclasses.field(
        default=0.1, metadata={"help": "EAGLE and block: weight of the soft token loss"}
    )
    noise: float = dataclasses.field(
        default=0.1,
        metadata={"help": "EAGLE and block: uniform noise on input features, as a fraction of their RMS"},
    )
    draft_vocab_size: int = dataclasses.field(
        default=0,
        metadata={"help": "score only the N most frequent target tokens of the data (0 = full vocabulary)"},
    )
    lora_rank: int = dataclasses.field(
        default=0, metadata={"help": "LoRA rank on the vocabulary read-out (0 = none)"}
    )
    lora_alpha: float = dataclasses.field(default=16.0, metadata={"help": "LoRA alpha"})
    lora_dropout: float = dataclasses.field(default=0.0, metadata={"help": "LoRA dropout"})
    loss_on_prompt: bool = dataclasses.field(
        default=False, metadata={"help": "also learn to predict prompt tokens"}
    )
    log_every: int = dataclasses.field(default=10, metadata={"help": "steps between logged metrics"})
    eval_every: int = dataclasses.field(
        default=0, metadata={"help": "steps between tau measurements (0 = end only)"}
    )
    tau_prompts: int = dataclasses.field(default=3, metadata={"help": "held-out prompts per tau measurement"})
    tau_new_tokens: int = dataclasses.field(default=64, metadata={"help": "tokens generated per tau prompt"})
    checkpoint_every: int = dataclasses.field(default=100, metadata={"help": "steps between checkpoints"})
    keep_checkpoints: int = dataclasses.field(default=2, metadata={"help": "newest checkpoints kept"})
    max_param_fraction: float = dataclasses.field(
        default=0.05,
        metadata={
            "help": "refuse drafters owning more than this fraction of the target's parameters (0 = off)"
        },
    )

    def __post_init__(self):
        if self.kind not in DRAFTER_KINDS:
            raise ValueError(
                f"unknown drafter kind {self.kind!r}; choose one of {', '.join(sorted(DRAFTER_KINDS))}"
            )
        positive = (
            "steps",
            "batch_tokens",
            "grad_accum",
            "medusa_heads",
            "medusa_layers",
            "unroll",
            "block_depths",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "tau_new_tokens",
        )
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "draft_vocab_size", "lora_rank", "tau_prompts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        for name in ("min_lr_ratio", "head_decay", "step_decay"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in (
            "weight_decay",
            "grad_clip",
            "feature_weight",
            "token_weight",
            "noise",
            "lora_dropout",
            "max_param_fraction",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.feature_weight == 0 and self.token_weight == 0:
            raise ValueError("feature_weight and token_weight are both 0: nothing to learn")

    def drafter_options(self) -> dict[str, Any]:
        base = {"draft_vocab_size": self.draft_vocab_size}
        if self.kind == "medusa":
            return {**base, "num_heads": self.medusa_heads, "num_layers": self.medusa_layers}
        if self.kind == "block":
            return {**base, "block_depths": self.block_depths}
        return base

    def scored_depths(self) -> tuple[str, int]:
        """The metric prefix and count of the depths the kind's objective scores per row."""
        if self.kind == "medusa":
            return "head", self.medusa_heads
        if self.kind == "block":
            return "depth", self.block_depths
        return "step", self.unroll


@dataclass
class CalibrationConfig:
    tree_nodes: int = dataclasses.field(
        default=24, metadata={"help": "node budget of the static tree, root included"}
    )
    depth: int = dataclasses.field(
        default=6, metadata={"help": "deepest level measured (Medusa: at most its heads)"}
    )
    top_k: int = dataclasses.field(default=8, metadata={"help": "candidate ranks measured per level"})
    batch_tokens: int = dataclasses.field(default=2048, metadata={"help": "rows per measuring batch"})

    def __post_init__(self):
        for name in ("tree_nodes", "depth", "top_k", "batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"calibration {name} must be >= 1, got {getattr(self, name)}")


@dataclass
class RunConfig:
    out: str = dataclasses.field(default="", metadata={"help": "directory the trained drafter is saved to"})
    work_dir: str = dataclasses.field(
        default="", metadata={"help": "caches and checkpoints (default: OUT.work)"}
    )
    model: str = dataclasses.field(
        default="default", metadata={"help": "target model: default, hub id, dir, .gguf"}
    )
    dtype: str | None = dataclasses.field(
        default=None, metadata={"help": "target dtype while training (default: fp32 CPU, bf16 CUDA)"}
    )
    data_dtype: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "target dtype for the data stages (self-written prompts, distillation, feature "
            f"capture): auto (bf16 where the device computes bf16 natively: CUDA, CPUs with AVX512_BF16 "
            f"or AMX; else the training dtype) or one of {', '.join(DATA_DTYPES)}"
        },
    )
    held_out: int = dataclasses.field(
        default=24, metadata={"help": "examples kept out of training (calibration, tau)"}
    )
    save_dtype: str = dataclasses.field(
        default="float16", metadata={"help": f"stored weight dtype: {', '.join(SAVE_DTYPES)}"}
    )
    time_budget: str = dataclasses.field(
        default="",
        metadata={
            "help": "finish in about this wall time (e.g. 2h, 90m, 5400): the stages' rates are measured "
            "on a first batch, then the number of prompts and --steps are planned to fit (3 epochs, "
            "more steps if the data runs out); empty = off"
        },
    )
    wandb: str = dataclasses.field(
        default="offline", metadata={"help": "W&B mode: offline, online, disabled"}
    )
    wandb_project: str = dataclasses.field(default="selfspec", metadata={"help": "W&B project"})
    resume: bool = dataclasses.field(
        default=False, metadata={"help": "continue an interrupted run in WORK_DIR"}
    )
    overwrite: bool = dataclasses.field(
        default=False, metadata={"help": "delete WORK_DIR's caches and start over"}
    )

    def __post_init__(self):
        if not self.out:
            raise ValueError("--out is required: the directory the trained drafter is written to")
        if self.data_dtype != "auto" and self.data_dtype not in DATA_DTYPES:
            raise ValueError(
                f"data dtype must be auto or one of {', '.join(DATA_DTYPES)}, got {self.data_dtype!r}"
            )
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype!r}")
        if self.held_out < 1:
            raise ValueError(f"held_out must be >= 1 (calibration needs held-out data), got {self.held_out}")
        if self.time_budget:
            from selfspec.training.budget import parse_duration

            parse_duration(self.time_budget)
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other; pick one")
        self.work_dir = self.work_dir or f"{self.out.rstrip('/')}.work"


@dataclass
class Settings:
    run: RunConfig
    data: DataConfig
    distill: DistillConfig
    features: FeatureConfig
    train: TrainConfig
    calibrate: CalibrationConfig

    def to_dict(self) -> dict[str, Any]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}


def check_work_dir(run: RunConfig) -> None:
    """A work dir with checkpoints needs --resume or --overwrite (never a silent restart)."""
    latest = Path(run.work_dir) / "checkpoints" / "latest"
    if latest.is_file() and not (run.resume or run.overwrite):
        raise ValueError(
            f"{run.work_dir} holds a training run ({latest.read_text().strip()}); "
            "pass --resume to continue it or --overwrite to start over"
        )
