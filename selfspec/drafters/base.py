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
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from selfspec.tree import TreeBuffers, build_tree

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class DrafterConfig:
    """Fields every drafter kind has; kinds extend it with their own (each with a help string)."""

    hidden_size: int = dataclasses.field(metadata={"help": "target hidden size (must match the target)"})
    vocab_size: int = dataclasses.field(metadata={"help": "target vocabulary size (must match the target)"})
    target_architecture: str = dataclasses.field(
        default="", metadata={"help": "target class name, e.g. LlamaForCausalLM (checked at load)"}
    )
    target_name: str = dataclasses.field(default="", metadata={"help": "informational: the target it was trained on"})
    tree: list[list[int]] | None = dataclasses.field(
        default=None, metadata={"help": "static tree as Medusa-style paths; None = the kind's default tree"}
    )

    def __post_init__(self):
        for name in ("hidden_size", "vocab_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.tree is not None:
            build_tree(self.tree)  # raises a ValueError naming the bad path

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

    def __init__(self, config: DrafterConfig, shared: SharedModules):
        super().__init__()
        self.config = config
        self._shared = shared  # a dataclass, so nn.Module does not register (save, train) it
        paths = config.tree if config.tree is not None else self.default_paths()
        self.tree = build_tree(paths)  # the static tree propose() uses unless given another

    def default_paths(self) -> list[tuple[int, ...]]:
        """The kind's default static tree when the config names none (before calibration)."""
        raise NotImplementedError

    def begin(self, max_len: int) -> Any:
        """Per-generation state (e.g. a drafter KV cache); None for stateless drafters."""
        return None

    def propose(self, state: Any, hidden: torch.Tensor, next_tokens: torch.Tensor, tree: TreeBuffers) -> Draft:
        raise NotImplementedError

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        return self._shared.lm_head(h)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self._shared.embed(ids)

    def num_parameters_own(self) -> int:
        """Parameters the drafter owns (the shared embedding and lm_head are not counted)."""
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` atomically (a kill leaves the old files)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            meta = {"format_version": FORMAT_VERSION, "kind": self.kind, **self.config.to_dict()}
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"kind": self.kind})
            _replace_dir(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return directory


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing an existing ``dst`` with a rename (never a half-written dir)."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def read_drafter_config(directory: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a saved drafter, with errors that say what to fix."""
    if not directory.is_dir():
        raise FileNotFoundError(f"drafter directory {directory} does not exist; pass a directory written by save_pretrained")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; a drafter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the drafter files are corrupt, save or download them again") from e
    if not isinstance(meta, dict) or "kind" not in meta:
        raise ValueError(f"{path} has no 'kind' field; it is not a selfspec drafter config")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {meta['format_version']}; upgrade selfspec to load it")
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
        raise FileNotFoundError(f"{path} is missing; a drafter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({e}); the drafter weights are corrupt, save or download them again") from e
    try:
        drafter.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not match the drafter described by its config.json: {e}") from e
