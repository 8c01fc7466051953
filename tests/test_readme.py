"""The README's snippets run as written, and .ci/run calls the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_snippets_run(monkeypatch):
    monkeypatch.chdir(ROOT)  # the snippets run from the repository root, as a reader's would
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the snippets are ours


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = next(line.strip() for line in readme.splitlines() if "python -m pytest" in line)
    assert command in (ROOT / ".ci" / "run").read_text()
