"""The training loop: packed batches of cached features, a frozen target, atomic checkpoints.

One loop serves both drafter kinds (``objectives.py`` holds what each learns). Distribution goes
through ``accelerate.Accelerator``: one process on CPU, DDP under ``accelerate launch`` or
``torchrun``; rank r takes every world-th pack, so the data order depends only on the seed.

Checkpoints (``<work>/checkpoints/step-N/``) hold the drafter's trainable state, the optimizer,
the scheduler, the step and every RNG (noise generator, Python, torch, CUDA; one file per rank),
written to a temp directory and renamed, then named in ``latest``. The batch of step s is a pure
function of (seed, s), so a run resumed from step N/2 ends bit-identical to one that ran N steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import selfspec
from selfspec.drafters import TrainableBlock, TrainableHeads, TrainableStep
from selfspec.io import atomic_torch_save, atomic_write_text
from selfspec.tracking import Run
from selfspec.training.config import TrainConfig
from selfspec.training.features import Sequence
from selfspec.training.objectives import (
    BlockObjective,
    EagleObjective,
    MedusaObjective,
    Pack,
    TargetReadout,
)
from selfspec.training.utils import (
    Dist,
    progress,
    rng_state,
    set_rng_state,
)


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]  # the last logged window
    tau: list[tuple[int, float]]  # (step, mean accepted length) of each measurement
    seconds: float
    tokens_per_s: float


# ----------------------------------------------------------------------------------- batches
def draft_vocabulary(sequences: list[Sequence], size: int, vocab_size: int) -> torch.Tensor:
    """The ``size`` most frequent reply tokens (ties by id), padded with the lowest unused ids."""
    counts: Counter = Counter()
    for s in sequences:
        counts.update(s.ids[s.prompt_len :].tolist())
    ranked = [t for t, _ in sorted(counts.items(), key=lambda tc: (-tc[1], tc[0]))][:size]
    seen = set(ranked)
    ranked += [t for t in range(vocab_size) if t not in seen][: size - len(ranked)]
    return torch.tensor(sorted(ranked), dtype=torch.long)


def plan_packs(lengths: list[int], batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """Sequence indices of each pack of one epoch: a seeded shuffle, packed greedily in order."""
    order = list(range(len(lengths)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    packs, current, used = [], [], 0
    for i in order:
        n = min(lengths[i], batch_tokens)
        if current and used + n > batch_tokens:
            packs.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        packs.append(current)
    return packs


def collate(sequences: list[Sequence], indices: list[int], batch_tokens: int) -> Pack:
    """Sequences end to end (each cut to ``batch_tokens``) as one ``Pack``."""
    hidden, tokens, seq, pos, length, prompt, fused = [], [], [], [], [], [], []
    for j, i in enumerate(indices):
        s = sequences[i]
        n = min(s.ids.numel(), batch_tokens)
        hidden.append(s.hidden[:n])
        if s.layers:
            fused.append(torch.cat([layer[:n] for layer in s.layers], -1))
        tokens.append(s.ids[:n])
        pos.append(torch.arange(n))
        for out, value in ((seq, j), (length, n), (prompt, s.prompt_len)):
            out.append(torch.full((n,), value, dtype=torch.long))
    return Pack(
        *(torch.cat(t) for t in (hidden, tokens, seq, pos, length, prompt)),
        torch.cat(fused) if fused else None,
    )


class PackSchedule:
    """Pack number g (over all steps, micro-batches and ranks) -> sequence indices; epochs roll over
    (each epoch its own seeded order, so pack counts may differ by one or two between epochs)."""

    def __init__(self, sequences: list[Sequence], batch_tokens: int, seed: int):
        self.lengths = [s.ids.numel() for s in sequences]
        self.batch_tokens, self.seed = batch_tokens, seed
        self.counts: list[int] = []  # packs in each epoch planned so far
        self._epoch, self._packs = -1, []

    def _plan(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            self._epoch, self._packs = epoch, plan_packs(self.lengths, self.batch_tokens, self.seed, epoch)
        return self._packs

    @property
    def per_epoch(self) -> int:
        if not self.counts:
            self.counts.append(len(self._plan(0)))
        return self.counts[0]

    def __getitem__(self, g: int) -> list[int]:
        epoch = 0
        while True:
            if epoch == len(self.counts):
                self.counts.append(len(self._plan(epoch)))
            if g < self.counts[epoch]:
                return self._plan(epoch)[g]
            g, epoch = g - self.counts[epoch], epoch + 1


def lr_lambda(config: TrainConfig):
    def scale(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return scale


# ----------------------------------------------------------------------------------- drafter
def build_drafter(model: Any, config: TrainConfig, sequences: list[Sequence]) -> selfspec.Drafter:
    """A fresh drafter in fp32 (master weights), its draft vocabulary and LoRA read-out set up."""
    torch.manual_seed(config.seed)
    drafter = selfspec.new_drafter(config.kind, model, **config.drafter_options()).float()
    if config.draft_vocab_size:
        drafter.set_draft_vocab(
            draft_vocabulary(sequences, config.draft_vocab_size, drafter.config.vocab_size)
        )
    if config.lora_rank:
        import peft

        drafter.add_vocab_lora(
            peft.LoraConfig(
                r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout
            )
        )
    target_params = sum(p.numel() for p in model.parameters())
    own = drafter.num_parameters_own()
    if config.max_param_fraction and own > config.max_param_fraction * target_params:
        raise ValueError(
            f"the drafter owns {own:,} parameters, {own / target_params:.1%} of the target's "
            f"{target_params:,} (limit {config.max_param_fraction:.0%}); use fewer heads/layers, "
            "a smaller LoRA rank, or raise --max-param-fraction"
        )
    return drafter


def trainable_state(drafter: nn.Module) -> dict[str, torch.Tensor]:
    """The drafter's own tensors (the target-derived read-out is a non-persistent buffer: left out)."""
    return {k: v.detach().clone() for k, v in drafter.state_dict().items()}


def _trainable_parameters(drafter: nn.Module) -> list[nn.Parameter]:
    params = list(drafter.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


# ----------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(
        self,
        model: Any,
        sequences: list[Sequence],
        config: TrainConfig,
        work_dir: Path,
        tau_prompts: list[list[int]] | None = None,
        wandb_mode: str = "offline",
        wandb_project: str = "selfspec",
        accelerator: Any = None,
        wandb_resume: bool = False,
    ):
        from accelerate import Accelerator

        self.model, self.sequences, self.config, self.work_dir = model, sequences, config, work_dir
        self.tau_prompts = tau_prompts or []
        self.accelerator = accelerator or Accelerator(
            cpu=model.device.type == "cpu", mixed_precision=_precision(model)
        )
        self.dist = Dist.from_accelerator(self.accelerator)
        self.drafter = build_drafter(model, config, sequences).to(self.accelerator.device)
        self.objective = self._objective()
        self.optimizer = torch.optim.AdamW(
            _trainable_parameters(self.drafter),
            lr=config.lr,
            betas=(0.9, 0.95),
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.objective, self.optimizer = self.accelerator.prepare(self.objective, self.optimizer)
        self.noise_rng = torch.Generator().manual_seed(config.seed)
        self.schedule = PackSchedule(sequences, config.batch_tokens, config.seed)
        self.step = 0
        self.tau: list[tuple[int, float]] = []
        self.tracker = Run(
            wandb_mode,
            wandb_project,
            work_dir,
            dataclasses.asdict(config),
            job_type="train",
            name=f"train-{Path(work_dir).name}",
            enabled=self.dist.is_main,
            resume=wandb_resume,  # a resumed training continues its W&B run
        )

    def _objective(self) -> nn.Module:
        c, d = self.config, self.drafter
        if isinstance(d, TrainableHeads):
            t2d = None
            if d.draft_ids is not None:
                t2d = torch.full((d.config.vocab_size,), -100, dtype=torch.long, device=d.draft_ids.device)
                t2d[d.draft_ids] = torch.arange(d.draft_ids.numel(), device=t2d.device)
            return MedusaObjective(d, c.head_decay, t2d)
        readout = TargetReadout(self.model.get_output_embeddings(), d.draft_ids)
        if isinstance(d, TrainableBlock):
            return BlockObjective(d, readout, c.token_weight, c.step_decay, c.loss_on_prompt)
        if not isinstance(d, TrainableStep):
            raise TypeError(
                f"a {d.kind} drafter offers no training protocol (selfspec.drafters.TrainableHeads, "
                "TrainableStep or TrainableBlock); implement one to train it"
            )
        return EagleObjective(
            d, readout, c.unroll, c.feature_weight, c.token_weight, c.step_decay, c.loss_on_prompt
        )

    # ------------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_root(self) -> Path:
        return self.work_dir / "checkpoints"

    def save_checkpoint(self) -> None:
        """Write ``step-N`` atomically (every rank its RNG file), then point ``latest`` at it."""
        root, name = self.checkpoint_root, f"step-{self.step:07d}"
        tmp = root / f".{name}.tmp"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        atomic_torch_save(
            {"rng": rng_state(), "noise_rng": self.noise_rng.get_state()},
            tmp / f"rng-rank{self.dist.rank}.pt",
        )
        if self.dist.is_main:
            atomic_torch_save(
                {
                    "step": self.step,
                    "config": dataclasses.asdict(self.config),
                    "drafter": trainable_state(self.drafter),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "tau": self.tau,
                },
                tmp / "state.pt",
            )
        self.dist.barrier()
        if self.dist.is_main:
            shutil.rmtree(root / name, ignore_errors=True)
            tmp.replace(root / name)
            atomic_write_text(root / "latest", name + "\n")
            for old in sorted(root.glob("step-*"))[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()

    def load_checkpoint(self) -> bool:
        """Restore the newest checkpoint, if any; True when one was found."""
        latest = self.checkpoint_root / "latest"
        if not latest.is_file():
            return False
        directory = self.checkpoint_root / latest.read_text().strip()
        state = torch.load(directory / "state.pt", map_location="cpu", weights_only=False)
        changed = {
            k: (v, getattr(self.config, k))
            for k, v in state["config"].items()
            if k not in RESUMABLE and getattr(self.config, k, v) != v
        }
        if changed:
            key, (old, new) = next(iter(changed.items()))
            raise ValueError(
                f"checkpoint {directory} was trained with {key}={old!r}, not {new!r}; resume with the "
                "same settings or start a new --work-dir"
            )
        try:
            self.drafter.load_state_dict(state["drafter"], strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"checkpoint {directory} does not fit this drafter: {str(e).splitlines()[0]}"
            ) from e
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.tau = state["step"], [tuple(t) for t in state["tau"]]
        rng_file = directory / f"rng-rank{self.dist.rank}.pt"
        rng = torch.load(rng_file if rng_file.is_file() else directory / "rng-rank0.pt", weights_only=False)
        set_rng_state(rng["rng"])
        self.noise_rng.set_state(rng["noise_rng"])
        return True

    # ------------------------------------------------------------------------------ loop
    def _pack(self, micro: int) -> Pack:
        c, w = self.config, self.dist.world_size
        g = (self.step * c.grad_accum + micro) * w + self.dist.rank
        return collate(self.sequences, self.schedule[g], c.batch_tokens).to(self.accelerator.device)

    def _noise(self, pack: Pack) -> torch.Tensor:
        h = pack.drafter_input(self.drafter).float()
        u = torch.rand(h.shape, generator=self.noise_rng).to(h.device) * 2 - 1
        return u * self.config.noise * h.pow(2).mean(-1, keepdim=True).sqrt()

    def train_step(self) -> dict[str, torch.Tensor]:
        c, totals = self.config, Counter()
        for micro in range(c.grad_accum):
            pack = self._pack(micro)
            args = (pack,) if c.kind == "medusa" else (pack, self._noise(pack))
            sync = (
                contextlib.nullcontext()
                if micro == c.grad_accum - 1
                else self.accelerator.no_sync(self.objective)
            )
            with sync, self.accelerator.autocast():
                loss, metrics = self.objective(*args)
                self.accelerator.backward(loss / c.grad_accum)
            totals.update({k: v.detach().float() for k, v in metrics.items()})
            totals["loss"] += loss.detach().float() / c.grad_accum
            totals["rows"] += float(pack.rows)
        if c.grad_clip:
            totals["grad_norm"] = self.accelerator.clip_grad_norm_(
                self.drafter.parameters(), c.grad_clip
            ).float()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return dict(totals)

    def train(self, resume: bool = False) -> TrainResult:
        c = self.config
        if resume and self.load_checkpoint() and self.dist.is_main:
            print(f"[train] resumed from step {self.step}")
        bar = progress(total=c.steps, desc="train", unit="step", disable=not self.dist.is_main)
        bar.update(self.step)
        window, started, rows_done, last = Counter(), time.perf_counter(), 0.0, {}
        tick = time.perf_counter()
        while self.step < c.steps:
            totals = self.train_step()
            window.update(totals)
            window["steps"] += 1
            rows_done += float(totals["rows"])
            if self.step % c.log_every == 0 or self.step == c.steps:
                last = self._log(window, time.perf_counter() - tick)
                bar.set_postfix(loss=f"{last['loss']:.3f}", acc0=f"{last.get('acc/0', 0):.2f}")
                window, tick = Counter(), time.perf_counter()
            if c.eval_every and self.step % c.eval_every == 0 and self.step < c.steps:
                self.measure_tau()
            if self.step % c.checkpoint_every == 0 or self.step == c.steps:
                self.save_checkpoint()
            bar.update(1)
        bar.close()
        if not self.tau or self.tau[-1][0] != self.step:
            self.measure_tau()
        seconds = time.perf_counter() - started
        return TrainResult(
            self.step, last, self.tau, seconds, rows_done * self.dist.world_size / max(seconds, 1e-9)
        )

    def _log(self, window: Counter, seconds: float) -> dict[str, float]:
        """Reduce the window's sums over ranks; log losses, per-depth accuracy, lr, throughput."""
        keys = sorted(window)
        values = torch.stack(
            [torch.as_tensor(window[k], dtype=torch.float64).to(self.accelerator.device) for k in keys]
        )
        values = self.accelerator.reduce(values, reduction="sum") if self.dist.world_size > 1 else values
        w = dict(zip(keys, values.tolist()))
        steps = w["steps"]
        out = {
            "loss": w["loss"] / steps,
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_s": w["rows"] / max(seconds, 1e-9),
            "epoch": self._epoch(),
        }
        if "grad_norm" in w:
            out["grad_norm"] = w["grad_norm"] / steps
        prefix, depths = self.config.scored_depths()
        for k in range(depths):
            n = max(w.get(f"{prefix}{k}/count", 0.0), 1.0)
            out[f"acc/{k}"] = w.get(f"{prefix}{k}/correct", 0.0) / n
            for name in ("loss_sum", "feature_loss_sum", "token_loss_sum"):
                if f"{prefix}{k}/{name}" in w:
                    out[f"{name.replace('_sum', '')}/{k}"] = w[f"{prefix}{k}/{name}"] / n
        self.tracker.log(out, step=self.step)
        return out

    def _epoch(self) -> float:
        return self.step * self.config.grad_accum * self.dist.world_size / max(1, self.schedule.per_epoch)

    def measure_tau(self) -> float | None:
        """Mean accepted length with the real ``selfspec.generate`` loop on held-out prompts."""
        if not self.tau_prompts or not self.config.tau_prompts:
            return None
        tau = None
        if self.dist.is_main:
            tau = measure_tau(
                self.model,
                self.drafter,
                self.tau_prompts[: self.config.tau_prompts],
                self.config.tau_new_tokens,
            )
            self.tau.append((self.step, tau))
            self.tracker.log({"tau": tau}, step=self.step)
        self.dist.barrier()
        return tau


def _precision(model: Any) -> str:
    """bf16 autocast on CUDA (the drafter keeps fp32 master weights over a bf16 target); none on CPU."""
    return "bf16" if model.device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"


RESUMABLE = {
    "steps",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "tau_prompts",
    "tau_new_tokens",
}


def deployable_copy(drafter: selfspec.Drafter, model: Any) -> selfspec.Drafter:
    """The drafter as ``load_drafter`` would give it (target dtype, eval mode): saved and reloaded."""
    with tempfile.TemporaryDirectory() as tmp:
        drafter.save_pretrained(Path(tmp) / "d")
        return selfspec.load_drafter(Path(tmp) / "d", model)


def measure_tau(
    model: Any, drafter: selfspec.Drafter, prompts: list[list[int]], new_tokens: int, tree: Any = None
) -> float:
    """Token-weighted tau over ``prompts`` (each ``[n]`` ids) with the real decode loop."""
    with torch.random.fork_rng(devices=[]):  # building the copy draws init values: keep training's RNG intact
        copy = deployable_copy(drafter, model)
    produced = steps = 0
    for ids in prompts:
        stats = selfspec.generate(
            model, torch.tensor(ids), drafter=copy, max_new_tokens=new_tokens, tree=tree
        ).stats
        produced, steps = produced + stats.mean_accepted_length * stats.steps, steps + stats.steps
    return produced / max(steps, 1)
