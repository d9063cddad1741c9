"""The README's two commands are the ones users and CI run; keep CI's equal to the README's."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme_commands()
    assert "pytest" in ci


def test_readme_main_command_installs_cpu_torch_first_and_generates():
    main = readme_commands()[0]
    assert main.index("torch==") < main.index("pip install -e .")
    assert "selfspec generate" in main and "--compare" in main
