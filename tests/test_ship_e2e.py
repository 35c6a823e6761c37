"""End to end through the real console script: run -> export -> retrain -> predict, on `synthetic`.

Every step is a subprocess of the installed `catdog-hpo` in a fresh working folder, with the
default study store (studies/catdog.db), as a user would type it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow

STUDY = "quick-tpe-synthetic"  # run's default name for --space quick --sampler tpe --dataset synthetic


def catdog_hpo() -> str:
    exe = shutil.which("catdog-hpo") or str(Path(sys.executable).with_name("catdog-hpo"))
    assert Path(exe).exists(), "the catdog-hpo console script is not installed (pip install -e .)"
    return exe


def cli(cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([catdog_hpo(), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    if ok:
        assert proc.returncode == 0, f"catdog-hpo {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cwd = tmp_path_factory.mktemp("ship")
    cli(cwd, "run", "--space", "quick", "--dataset", "synthetic", "--trials", "2", "--epochs", "1", "--no-progress")
    export = cli(cwd, "export", "--study", STUDY)
    # A few PNGs from the synthetic set (its own val images), in class folders for --test.
    from catdog_hpo.data.builtin import SYNTHETIC_CLASSES, synthetic_images

    x, y = synthetic_images(8, 32, seed=12345)
    for i in range(len(y)):
        folder = cwd / "test" / SYNTHETIC_CLASSES[int(y[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(folder / f"img{i}.png")
    command = export.stdout.strip().splitlines()[-1].split()  # "catdog-hpo retrain --config FILE"
    assert command[:3] == ["catdog-hpo", "retrain", "--config"]
    retrain = cli(cwd, *command[1:], "--test", "test", "--device", "cpu", "--no-progress")
    return {"cwd": cwd, "export": export, "retrain": retrain, "config": cwd / command[3],
            "out": cwd / "studies" / "models" / Path(command[3]).stem, "labels": y.tolist()}


def test_export_file_and_command(shipped: dict) -> None:
    from catdog_hpo.config import load_trial_config, read_mapping

    doc = read_mapping(shipped["config"])
    assert shipped["config"].parent == shipped["cwd"] / "studies" / "exports"
    assert doc["study"] == STUDY and doc["data"]["source"]["name"] == "synthetic"
    assert load_trial_config(shipped["config"]).train.epochs == 1
    assert "reproduce it with:" in shipped["export"].stdout


def test_retrain_reproduces_the_trial_and_writes_everything(shipped: dict) -> None:
    out, text = shipped["out"], shipped["retrain"].stdout
    m = json.loads((out / "metrics.json").read_text())
    # Another process, the same seed on the CPU: the trial's final val accuracy exactly.
    rep = m["reproduction"]
    assert rep["comparable"] and rep["difference"] == 0, rep
    assert "(identical)" in text
    from catdog_hpo.config import read_mapping

    trial_history = read_mapping(shipped["config"])["metrics"]["history"]
    assert [h["train_loss"] for h in m["history"]] == [h["train_loss"] for h in trial_history]
    assert m["test"]["n"] == 8 and m["test_acc"]["n"] == 1
    for fmt in ("torchscript", "onnx", "pt2"):
        assert m["exports"][fmt]["ok"] and m["exports"][fmt]["max_abs_diff"] < 1e-4
        assert f"{fmt}: " in text and "max |logit diff| vs PyTorch" in text
    for name in ("model.pt", "model.ts", "model.onnx", "model.pt2", "metrics.json", "curves.svg"):
        assert (out / name).is_file(), name
    assert f"next: catdog-hpo predict --model {out.relative_to(shipped['cwd'])}/model.pt" in text


@pytest.mark.parametrize("model", ["model.onnx", "model.pt2"])
def test_predict_with_checkpoint_onnx_and_pt2(shipped: dict, model: str) -> None:
    # The README's path on a default install (ONNX is a main dependency): every step exits 0.
    cwd, out = shipped["cwd"], shipped["out"]
    table = cli(cwd, "predict", "--model", str(out / "model.pt"), "test", "--device", "cpu").stdout.splitlines()
    assert table[0].split() == ["image", "class", "probability"] and len(table) == 9
    lines = cli(cwd, "predict", "--model", str(out / model), "test", "--json").stdout.splitlines()
    rows = [json.loads(line) for line in lines]
    from catdog_hpo.data.builtin import SYNTHETIC_CLASSES

    assert len(rows) == 8 and all(r["class"] in SYNTHETIC_CLASSES for r in rows)
    # The same probabilities from the checkpoint and from the exported file.
    for line, row in zip(table[1:], rows):
        image, label, prob = line.split()
        assert image == row["image"] and label == row["class"]
        assert float(prob) == pytest.approx(row["probability"], abs=1e-4)


def test_bad_model_files_exit_2_without_traceback(shipped: dict) -> None:
    cwd = shipped["cwd"]
    (cwd / "model.pt").write_text("I am a text file")
    # (The other bad model files run in-process in test_predict.py: each subprocess pays torch's import.)
    proc = cli(cwd, "predict", "--model", "model.pt", "test", ok=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "catdog-hpo predict: error: --model model.pt: not a catdog-hpo checkpoint (not a PyTorch zip archive)\n"
    doc = shipped["config"].read_text().replace("format_version: 1", "format_version: 2")
    (cwd / "v2.yaml").write_text(doc)
    proc = cli(cwd, "retrain", "--config", "v2.yaml", "--no-progress", ok=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "format_version 2" in proc.stderr
    assert "Traceback" not in proc.stderr
