"""The source tree must not shadow installed packages when Python starts in the repository root.

``python -m pytest`` and ``python -m selfspec.cli`` (and a REPL) run with the repository root on
``sys.path``. Hugging Face's ``kernels`` package, which transformers imports at start-up, shares its
name with our top-level ``kernels/`` directory; that directory is a namespace portion (no
``__init__.py``, see kernels/README.md), so the installed package wins.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python_in_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_repo_root_does_not_shadow_a_top_level_kernels_package():
    probe = (
        "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s and s.origin else '')"
    )
    out = _python_in_root(probe)
    assert out.returncode == 0, out.stderr
    origin = out.stdout.strip()
    assert not origin or Path(origin).resolve() != ROOT / "kernels" / "__init__.py", (
        f"`import kernels` in the repo root finds {origin}, the source tree, not an installed package"
    )


def test_transformers_and_selfspec_kernels_import_in_repo_root():
    code = (
        "import transformers.activations\n"  # imports Hugging Face's `kernels` where it is installed
        "import selfspec.kernels.kv_commit, selfspec.kernels.tree_attention, selfspec.cache\n"
        "print(selfspec.kernels.kv_commit.__file__)"
    )
    out = _python_in_root(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()).name == "kv_commit.py"


def test_cpu_kernel_sources_ship_with_the_package():
    import selfspec.kernels.cpu_build as build

    sources = sorted(p.name for p in (Path(build.__file__).parent / "cpu").glob("*.c"))
    assert sources, "selfspec/kernels/cpu/*.c are missing: the CPU kernels cannot be compiled"
