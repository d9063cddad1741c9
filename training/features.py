"""Target features: one pass of the frozen target over every training sequence, cached on disk.

The drafters read ``hidden_states[-1]`` (post-norm, what ``lm_head`` reads), captured here with
``selfspec.target_features`` so training sees exactly the state ``generate`` hands the drafter.
The target's next-token distribution is not stored: it is ``lm_head(hidden)`` of the next
position, recomputed by the trainer from the cached state (76 KB per token saved at V=49152).

Footprint is bounded and reported: states are stored in fp16 (bf16/fp32 on request), 1,152
bytes a token for H=576, and capture stops at ``max_tokens``. Optional extra layers (EAGLE-3
style low/mid/high fusion) cost H * 2 bytes a token each.

Layout: ``features/shard-r<rank>-<k>.safetensors`` holding ``ids`` [N] int32, ``hidden`` [N, H],
``layer<i>`` [N, H] per extra layer, ``offsets`` [S+1] int64 (sequence s is rows
offsets[s]:offsets[s+1]) and ``prompt_lens`` [S]; the sequence ids are in the shard metadata.
Shards are written atomically, so an interrupted capture resumes at the next shard.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import selfspec
from selfspec.io import atomic_write_text
from selfspec.training.config import FeatureConfig
from selfspec.training.utils import Dist, progress

SETTINGS = "features.json"


@dataclass
class FeatureReport:
    sequences: int = 0
    tokens: int = 0
    cached_tokens: int = 0
    bytes_on_disk: int = 0
    truncated: int = 0
    dropped_over_budget: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        rate = (self.tokens - self.cached_tokens) / self.seconds if self.seconds else 0.0
        return (
            f"features: {self.sequences} sequences, {self.tokens} tokens ({self.cached_tokens} cached), "
            f"{self.bytes_on_disk / 2**20:.1f} MiB on disk, {rate:.0f} tok/s; {self.truncated} truncated, "
            f"{self.dropped_over_budget} over the token budget"
        )


@dataclass(frozen=True)
class Sequence:
    id: str
    ids: torch.Tensor  # [n] int64 tokens
    hidden: torch.Tensor  # [n, H] target last hidden state at each position (storage dtype)
    prompt_len: int  # positions before the response
    layers: tuple[torch.Tensor, ...] = ()  # [n, H] each: the states of the feature_layers asked for, in order


# ----------------------------------------------------------------------------------- capture
def _batches(
    items: list[tuple[str, list[int], int]], batch_tokens: int
) -> Iterable[list[tuple[str, list[int], int]]]:
    """Groups of similar length whose padded size stays under ``batch_tokens``."""
    batch: list[tuple[str, list[int], int]] = []
    for item in sorted(items, key=lambda it: len(it[1])):
        if batch and (len(batch) + 1) * len(item[1]) > batch_tokens:
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


@torch.no_grad()
def _forward(
    model: Any, batch: list[tuple[str, list[int], int]], config: FeatureConfig
) -> list[dict[str, torch.Tensor]]:
    width = max(len(ids) for _, ids, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, (_, seq, _) in enumerate(batch):  # right padding: causal rows never see the pads
        ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
    feats = selfspec.target_features(model, ids.to(model.device), mask.to(model.device))
    dtype, out = getattr(torch, config.dtype), []
    for i, (_, seq, _) in enumerate(batch):
        n = len(seq)
        row = {"ids": torch.tensor(seq, dtype=torch.int32), "hidden": feats.hidden[i, :n].to("cpu", dtype)}
        for layer in config.feature_layers:
            row[f"layer{layer}"] = feats.layers[layer][i, :n].to("cpu", dtype)
        if not torch.isfinite(row["hidden"]).all():
            raise ValueError(
                f"target hidden states overflow {config.dtype}; capture with --feature-dtype bfloat16 or float32"
            )
        out.append(row)
    return out


def _write_shard(path: Path, rows: list[dict[str, torch.Tensor]], meta: list[tuple[str, int]]) -> int:
    lens = torch.tensor([r["ids"].numel() for r in rows])
    tensors = {k: torch.cat([r[k] for r in rows]).contiguous() for k in rows[0]}
    tensors["offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    tensors["prompt_lens"] = torch.tensor([p for _, p in meta], dtype=torch.long)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"ids": json.dumps([i for i, _ in meta])})
    tmp.replace(path)
    return path.stat().st_size


def capture(
    model: Any,
    items: list[tuple[str, list[int], int]],  # (id, prompt + response token ids, prompt length)
    directory: Path,
    config: FeatureConfig,
    dist: Dist | None = None,
) -> FeatureReport:
    """Cache the target's features for ``items`` under ``directory`` (resuming a partial cache)."""
    dist = dist or Dist.single()
    directory.mkdir(parents=True, exist_ok=True)
    config = _check_settings(directory, config, model, dist)
    report = FeatureReport()
    have = {sid: n for sid, n in _cached(directory)}
    report.cached_tokens = sum(have.values())
    budget = config.max_tokens - report.cached_tokens
    todo = []
    for sid, ids, plen in items:
        if sid in have:
            continue
        if len(ids) > config.max_seq_len:
            ids, report.truncated = ids[: config.max_seq_len], report.truncated + 1
        if len(ids) < 2 or plen >= len(ids):
            continue  # nothing to learn from: no response position left
        if len(ids) > budget:
            report.dropped_over_budget += 1
            continue
        budget -= len(ids)
        todo.append((sid, ids, plen))
    dist.barrier()  # every rank has listed the cache before any rank writes to it
    _capture_shard(model, todo[dist.rank :: dist.world_size], directory, config, dist, report)
    dist.barrier()
    stored = _cached(directory)
    report.sequences, report.tokens = len(stored), sum(n for _, n in stored)
    report.bytes_on_disk = sum(p.stat().st_size for p in directory.glob("shard-*.safetensors"))
    return report


def _capture_shard(
    model, todo, directory: Path, config: FeatureConfig, dist: Dist, report: FeatureReport
) -> None:
    start, rows, meta = time.perf_counter(), [], []
    index = 1 + max(
        (int(p.stem.rsplit("-", 1)[1]) for p in directory.glob(f"shard-r{dist.rank}-*.safetensors")),
        default=-1,
    )
    bar = progress(
        total=sum(len(ids) for _, ids, _ in todo), desc="features", unit="tok", disable=not dist.is_main
    )
    for batch in _batches(todo, config.batch_tokens):
        rows += _forward(model, batch, config)
        meta += [(sid, plen) for sid, _, plen in batch]
        if sum(r["ids"].numel() for r in rows) >= config.shard_tokens:
            _write_shard(directory / f"shard-r{dist.rank}-{index:05d}.safetensors", rows, meta)
            rows, meta, index = [], [], index + 1
        bar.update(sum(len(ids) for _, ids, _ in batch))
    if rows:
        _write_shard(directory / f"shard-r{dist.rank}-{index:05d}.safetensors", rows, meta)
    bar.close()
    report.seconds = time.perf_counter() - start


def _check_settings(directory: Path, config: FeatureConfig, model: Any, dist: Dist) -> FeatureConfig:
    """The config to capture with: ``config``, or, where the cache already holds more layers than
    asked for (an EAGLE-3 cache reused by an EAGLE-1 run), ``config`` with the cache's layers, so
    every shard keeps holding the same layers and ``load`` picks the ones a run needs."""
    settings = {
        "dtype": config.dtype,
        "feature_layers": list(config.feature_layers),
        "hidden_size": int(model.config.get_text_config().hidden_size),
        "target_dtype": str(model.dtype).removeprefix("torch."),
        "max_seq_len": config.max_seq_len,
    }
    path = directory / SETTINGS
    if path.is_file():
        old = json.loads(path.read_text())
        if "extra_layers" in old:  # the name before feature_layers; the features are the same
            old["feature_layers"] = old.pop("extra_layers")
        old.setdefault("target_dtype", "float32")  # caches from before the key: an fp32 target
        subset = set(settings["feature_layers"]) <= set(old["feature_layers"])
        if not subset or old | {"feature_layers": settings["feature_layers"]} != settings:
            raise ValueError(
                f"{directory} holds features captured with {old}, not {settings}; "
                "use another --work-dir (or --overwrite) to capture again"
            )
        config = dataclasses.replace(config, feature_layers=list(old["feature_layers"]))
    elif dist.is_main:
        atomic_write_text(path, json.dumps(settings, indent=2) + "\n")
    dist.barrier()  # every rank, whichever branch it took: rank 0 may be writing the file now
    return config


# ------------------------------------------------------------------------------------ reading
def _shard_ids(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["ids"])


def _cached(directory: Path) -> list[tuple[str, int]]:
    """(sequence id, tokens) of every complete shard."""
    out = []
    for path in sorted(directory.glob("shard-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            ids = json.loads(f.metadata()["ids"])
            lens = f.get_tensor("offsets").diff().tolist()
        out += list(zip(ids, lens))
    return out


def load(directory: Path, feature_layers: Iterable[int] = ()) -> list[Sequence]:
    """Every cached sequence, in a stable order (shard by shard)."""
    from safetensors.torch import load_file

    sequences = []
    for path in sorted(directory.glob("shard-*.safetensors")):
        t, ids = load_file(str(path)), _shard_ids(path)
        off = t["offsets"].tolist()
        for s, sid in enumerate(ids):
            a, b = off[s], off[s + 1]
            layers = tuple(t[f"layer{i}"][a:b] for i in feature_layers)
            sequences.append(
                Sequence(sid, t["ids"][a:b].long(), t["hidden"][a:b], int(t["prompt_lens"][s]), layers)
            )
    if not sequences:
        raise ValueError(f"no cached features under {directory}; run the feature stage first")
    return sequences
