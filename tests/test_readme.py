"""The README's example runs, and its two set-up commands are the ones the tooling uses."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_the_readme_example_runs() -> None:
    [example] = re.findall(r"```python\n(.*?)```", README, re.DOTALL)[:1]
    assert len([line for line in example.splitlines() if line.strip()]) <= 15
    done = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "site for a1\n"


def test_the_readme_names_the_demo_and_test_commands() -> None:
    for marker, session in [("demo-command", "demo"), ("test-command", "tests")]:
        block = re.search(rf"<!-- {marker} -->\n```\n(.*?)\n```", README)
        assert block is not None, marker
        assert block.group(1).endswith(f"nox -s {session}")
