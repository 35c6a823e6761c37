"""`catdog-hpo train` end to end (the real console script) and its bad-input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from catdog_hpo.ship.checkpoint import load_checkpoint, load_model
from catdog_hpo.cli import main
from helpers import write_image_folder

REPO = Path(__file__).resolve().parents[1]
CONFIG = """\
image_size: 16
model:
  blocks: [{channels: 4}, {channels: 8}]
  head: gap
  dropout: 0.0
augment: {crop: none}
optim: {lr: 0.01, scheduler: none}
train: {epochs: 5, batch_size: 8}
"""


def console_script() -> list[str]:
    script = Path(sys.executable).with_name("catdog-hpo")
    return [str(script)] if script.exists() else [sys.executable, "-m", "catdog_hpo"]


def test_train_end_to_end(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "images", classes=("cat", "dog"), n_per_class=10, size=20, split=False)
    (tmp_path / "tiny.yaml").write_text(CONFIG)
    proc = subprocess.run(
        [*console_script(), "train", "--config", "tiny.yaml", "--data", "images", "--val-fraction", "0.25",
         "--epochs", "3", "--seed", "1", "--device", "cpu", "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["epoch", "train", "loss"])
    rows = [line.split() for line in lines[header + 1:header + 4]]
    assert [r[0] for r in rows] == ["1", "2", "3"] and all(len(r) == 6 for r in rows)
    for r in rows:
        assert 0.0 <= float(r[3]) <= 1.0  # val acc column

    out = tmp_path / "studies/runs/tiny"  # the default --out
    assert str(out.relative_to(tmp_path) / "best.pt") in proc.stdout
    ck = load_checkpoint(out / "best.pt")
    assert ck.classes == ("cat", "dog") and ck.image_size == 16
    assert ck.config.train.epochs == 3 and ck.config.train.seed == 1  # the overrides are saved
    history = json.loads((out / "history.json").read_text())
    assert history["status"] == "completed" and len(history["history"]) == 3
    best = history["history"][history["best_epoch"] - 1]
    assert ck.metrics["val_acc"] == best["val_acc"] == history["best_val_acc"]
    assert float(rows[history["best_epoch"] - 1][3]) == pytest.approx(best["val_acc"], abs=1e-4)

    import torch

    model, _ = load_model(out / "best.pt", torch.device("cpu"))
    assert not model.training
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 2)


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run_cli(["train", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("catdog-hpo train: error: ") and "nope.yaml" in err


def test_config_with_unknown_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("image_size: 16\nmodel: {wings: 2}\n")
    code, err = _run_cli(["train", "--config", str(path)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "bad.yaml" in err and "'wings'" in err


def test_infeasible_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "deep.yaml"
    blocks = ", ".join("{channels: 4}" for _ in range(6))
    path.write_text(f"image_size: 16\nmodel: {{blocks: [{blocks}]}}\n")
    code, err = _run_cli(["train", "--config", str(path), "--data", str(tmp_path / "never-read")], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "model.blocks: 6 blocks need a larger image than 16 px" in err


def test_cuda_without_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    path = tmp_path / "ok.yaml"
    path.write_text(CONFIG)
    code, err = _run_cli(["train", "--config", str(path), "--device", "cuda"], capsys)
    assert code == 2 and "--device cuda" in err and err.count("\n") == 1
