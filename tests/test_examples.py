"""The examples in README and docs are the files in examples/, and those files run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _code(path: Path) -> str:
    """An example's code without its module docstring."""
    text = path.read_text()
    return text.split('"""', 2)[2].strip() if text.startswith('"""') else text.strip()


def _blocks(doc: Path) -> list[str]:
    return [b.strip() for b in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)]


@pytest.mark.parametrize(("doc", "example"), [
    ("README.md", "examples/own_loop.py"),
    ("docs/online.md", "examples/selective_backprop_loop.py"),
])
def test_documented_examples_are_the_example_files(doc, example):
    assert _code(ROOT / example) in _blocks(ROOT / doc)


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    made = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_image_folder.py"),
                           "data/digits-folder"], cwd=tmp_path, env=env)
    assert made.returncode == 0
    ran = subprocess.run([sys.executable, str(ROOT / "examples" / "own_loop.py")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=900)
    assert ran.returncode == 0, ran.stderr
    assert "epoch 7:" in ran.stdout and (tmp_path / "digits-gm20.h5").exists()
