"""README.md is a front door (issue 24): small, its two set-up commands intact, every link live.

The depth lives in docs/; measured figures in bench/README.md. These checks read the files only.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_README_BYTES = 12_500  # "at most about 12 KB"


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)


def test_readme_is_a_front_door_of_about_12_kb() -> None:
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes: move the depth to docs/"


def test_readme_keeps_its_two_set_up_commands() -> None:
    lines = [line.strip() for block in _code_blocks(README.read_text()) for line in block.splitlines()]
    setups = [line for line in lines if line.startswith("python3 -m venv .venv && ")]
    # One sets up and runs a search on the default (offline, built-in) data set: no --data/--dataset.
    run = [line for line in setups if "pip install -e . &&" in line and "catdog-hpo run " in line]
    assert run and "--data" not in run[0], setups
    # The other sets up and runs the tests: the very command .ci/run runs (less pip's -q).
    ci = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines()
          if line.startswith("python3 -m venv .venv") and "pytest" in line]
    assert len(ci) == 1, ci
    assert ci[0].replace("pip install -q ", "pip install ") in setups, (ci, setups)


def test_relative_links_in_readme_and_docs_resolve() -> None:
    files = [README, REPO / "bench/README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for path in files:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # links in prose only
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", link) or link.startswith("#"):
                continue
            target = (path.parent / link.split("#")[0]).resolve()
            if not target.exists():
                broken.append(f"{path.relative_to(REPO)}: {link}")
    assert not broken, broken
