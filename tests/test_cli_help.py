"""`--help` must answer without importing the heavy libraries (torch, optuna, plotly, pandas, mlflow)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from catdog_hpo.cli import COMMANDS

HEAVY = ("torch", "torchvision", "optuna", "plotly", "pandas", "optuna_dashboard", "mlflow")

PROBE = """
import sys
from catdog_hpo.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print("HEAVY:" + ",".join(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"]] + [[c, "--help"] for c in COMMANDS])
def test_help_imports_nothing_heavy(argv: list[str]) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv, heavy=HEAVY)],
                         capture_output=True, text=True, check=True).stdout
    assert "usage:" in out
    assert out.strip().splitlines()[-1] == "HEAVY:", f"{argv} imported {out.strip().splitlines()[-1]}"
