"""Atomic file and directory writes: the one owner of "readers see the old or the new, never half".

Everything selfspec writes that a later run reads (autotune tables, the converted default model,
drafters, training checkpoints and caches, exports, eval results) goes through here: a temp file
or directory beside the target, fsynced, then one ``os.replace``. Modes are what a plain
``open``/``mkdir`` would give (``mkstemp``/``mkdtemp`` make 0600/0700).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def umask_mode(directory: bool = False) -> int:
    """The mode a plain ``open``/``mkdir`` would give under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def publish(path: Path) -> None:
    """Give ``path`` (a directory: and everything in it) the modes a plain write would have given."""
    path = Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, umask_mode(directory=p.is_dir()))


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[str]:
    """Yield a temp file name beside ``path``; once the body has written it, fsync it and rename it
    over ``path`` (with plain-write modes). On any error the temp file goes and ``path`` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced temp file and a rename."""
    with replacing(Path(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: Path, obj: Any, indent: int = 1, **kw: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, **kw) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a fsynced temp file and a rename."""
    import torch

    with replacing(Path(path)) as tmp:
        torch.save(obj, tmp)


def temp_dir_beside(target: Path) -> Path:
    """A private directory next to ``target`` (same file system, so ``replace_dir`` is a rename)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def replace_dir(src: Path, dst: Path) -> None:
    """Publish the finished directory ``src`` as ``dst``, replacing an existing ``dst`` by renames
    (never a half-written directory under ``dst``'s name)."""
    src, dst = Path(src), Path(dst)
    for p in [*src.rglob("*")]:
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    publish(src)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
