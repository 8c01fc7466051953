"""The README's snippets run as written, and .ci/run calls the README's test command."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_snippets_run(monkeypatch):
    """Every snippet, in order, in one namespace. A snippet that needs a package this environment lacks (the
    GPU image has neither ``kernels`` nor the encoder extra; CI installs the test extras, which have all of
    them) is left out and the test ends skipped, naming it, once the others ran."""
    from maxsim.encoder import EncoderUnavailable

    monkeypatch.chdir(ROOT)  # the snippets run from the repository root, as a reader's would
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    missing = []
    for block in blocks:
        imported = re.findall(r"^(?:import|from) (\w+)", block, flags=re.M)
        absent = [name for name in imported if importlib.util.find_spec(name) is None]
        if absent:
            missing += absent
            continue
        try:
            exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the snippets are ours
        except EncoderUnavailable:
            missing.append("the encoder extra")
    if missing:
        pytest.skip(f"README snippets needing {sorted(set(missing))} left out: not installed here")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = next(line.strip() for line in readme.splitlines() if "python -m pytest" in line)
    assert command in (ROOT / ".ci" / "run").read_text()
