"""`catdog-hpo retrain`: reproduction of the trial, train+val, seeds, --test, exports, metrics."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from catdog_hpo.ship.checkpoint import load_checkpoint
from catdog_hpo.cli import main
from catdog_hpo.config import TrialConfig, from_dict, read_mapping, to_dict, write_mapping
from catdog_hpo.data import DataSource
from catdog_hpo.errors import UserError
from catdog_hpo.ship.trialfile import ExportSettings, export_trial
from catdog_hpo.engine.metrics import accuracy, classification_report, confusion_matrix, mean_std
from catdog_hpo.ship.retrain import RetrainSettings, retrain
from test_export import color_image, make_tiny_study, write_color_folder

CPU = "cpu"
HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "val_acc", "lr")  # all but the wall time


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("retrain")
    info = make_tiny_study(tmp)
    done = export_trial(ExportSettings(study=info["study"], storage=info["storage"], studies_dir=info["studies"]))
    return {**info, "export": done.path, "trial": done.trial}


def settings(tiny: dict, out: Path, **kw) -> RetrainSettings:
    base = dict(config=tiny["export"], device=CPU, out=out, studies_dir=tiny["studies"], formats=())
    return RetrainSettings(**{**base, **kw})


def strip_time(history: list[dict]) -> list[dict]:
    return [{k: h[k] for k in HISTORY_KEYS} for h in history]


def test_reproduces_the_trial_exactly_on_the_cpu(tiny: dict, tmp_path: Path) -> None:
    """Same config, data and seed on the CPU: the retrained history IS the trial's history."""
    lines: list[str] = []
    result = retrain(settings(tiny, tmp_path / "m"), log=lines.append)
    trial = tiny["trial"]
    m = result.metrics
    assert strip_time(m["history"]) == strip_time(trial.user_attrs["history"])
    rep = m["reproduction"]
    assert rep["comparable"] and rep["trial_val_acc"] == trial.value and rep["difference"] == 0
    assert any("(identical)" in line for line in lines)
    # Trained on train only: the kept weights are the best epoch's, and their accuracy is that epoch's.
    best = max(m["history"], key=lambda h: h["val_acc"])
    assert m["seeds"][0]["kept_epoch"] == best["epoch"] and m["val"]["accuracy"] == best["val_acc"]
    assert m["val_held_out"] is True and m["val_note"] is None
    assert m["data"]["same_as_study"] is True
    assert sum(map(sum, m["val"]["confusion_matrix"])) == m["data"]["n_val"] == 12
    # Everything predict needs is in the checkpoint, and the files are there.
    ck = load_checkpoint(result.checkpoint)
    assert to_dict(ck.config) == read_mapping(tiny["export"])["config"]
    assert ck.classes == ("cat", "dog") and ck.image_size == 16 and len(ck.mean) == len(ck.std) == 3
    assert json.loads((tmp_path / "m/metrics.json").read_text())["kept_seed"] == 0
    assert (tmp_path / "m/curves.svg").read_text().startswith("<svg")
    assert not (tmp_path / "m/model.onnx").exists()  # formats=() skips the exports


def test_train_plus_val_keeps_the_final_epoch_and_says_val_is_not_held_out(tiny: dict, tmp_path: Path) -> None:
    lines: list[str] = []
    m = retrain(settings(tiny, tmp_path / "tv", train_on="train+val"), log=lines.append).metrics
    assert m["val_held_out"] is False and "not a held-out estimate" in m["val_note"]
    assert m["data"]["n_train"] == 48 and m["data"]["n_val"] == 12  # 36 train + 12 val images
    assert m["seeds"][0]["kept_epoch"] == m["seeds"][0]["epochs_run"] == 2
    # The kept weights are the final epoch's: evaluated again, they give that epoch's val accuracy.
    assert m["val"]["accuracy"] == m["history"][-1]["val_acc"]
    assert m["reproduction"]["comparable"] is False
    assert any("NOT held out" in line for line in lines)


def test_seeds_report_mean_and_std_and_keep_the_best(tiny: dict, tmp_path: Path) -> None:
    lines: list[str] = []
    result = retrain(settings(tiny, tmp_path / "s", seeds=3, seed=5, epochs=1), log=lines.append)
    m = result.metrics
    assert [s["seed"] for s in m["seeds"]] == [5, 6, 7]
    accs = [s["val_acc"] for s in m["seeds"]]
    assert m["val_acc"]["values"] == accs and m["val_acc"]["n"] == 3
    assert m["val_acc"]["mean"] == pytest.approx(statistics.mean(accs))
    assert m["val_acc"]["std"] == pytest.approx(statistics.stdev(accs))
    best = max(m["seeds"], key=lambda s: (s["val_acc"], -s["seed"]))
    assert m["kept_seed"] == best["seed"]
    assert load_checkpoint(result.checkpoint).config.train.seed == best["seed"]
    assert any("mean ± std over 3 seeds" in line for line in lines)
    assert m["reproduction"]["comparable"] is False  # another seed and epoch count than the trial's


def write_test_dir(root: Path, classes: tuple[str, ...] = ("cat", "dog"), n: int = 5) -> Path:
    rng = np.random.default_rng(7)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            color_image(label % 2, rng, size=(30, 22)).save(root / name / f"t{i}.png")
    return root


def test_test_dir_is_evaluated_and_its_classes_checked(tiny: dict, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    test = write_test_dir(tmp_path / "test")
    (test / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    m = retrain(settings(tiny, tmp_path / "t", test_dir=test, epochs=1), log=lambda s: None).metrics
    assert m["test"]["n"] == 10 and m["test_acc"]["n"] == 1
    assert m["test"]["accuracy"] == m["seeds"][0]["test_acc"] == m["test_acc"]["mean"]
    assert [row for row in map(sum, m["test"]["confusion_matrix"])] == [5, 5]
    other = write_test_dir(tmp_path / "other", classes=("cat", "horse"))
    code = main(["retrain", "--config", str(tiny["export"]), "--test", str(other), "--device", "cpu",
                 "--no-export", "--no-progress", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--test" in err and "(cat, horse) do not match the model's (cat, dog)" in err


def test_plain_config_needs_data_flags(tiny: dict, tmp_path: Path) -> None:
    cfg_file = tmp_path / "plain.yaml"
    write_mapping(cfg_file, read_mapping(tiny["export"])["config"])
    with pytest.raises(UserError, match=r"records no data source .*--data DIR or --dataset NAME"):
        retrain(RetrainSettings(config=cfg_file, device=CPU, studies_dir=tiny["studies"], formats=()))
    src = DataSource(path=str(tiny["data"]), val_fraction=0.25, split_seed=0)
    m = retrain(settings(tiny, tmp_path / "p", config=cfg_file, data=src), log=lambda s: None).metrics
    assert m["reproduction"] is None and m["data"]["same_as_study"] is None
    assert strip_time(m["history"]) == strip_time(tiny["trial"].user_attrs["history"])


def test_bad_inputs_are_one_line_errors(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    doc = read_mapping(tiny["export"])
    doc["format_version"] = 99
    future = tmp_path / "future.yaml"
    write_mapping(future, doc)
    cases = [
        (["--config", str(future)], "format_version 99; this catdog-hpo reads version 1"),
        (["--config", str(tmp_path / "missing.yaml")], "missing.yaml: no such file"),
        (["--config", str(tiny["export"]), "--val-fraction", "0.3"], "--val-fraction/--split-seed need --data"),
        (["--config", str(tiny["export"]), "--data", str(tmp_path / "nodata")], "nodata: no such folder"),
    ]
    for argv, message in cases:
        assert main(["retrain", *argv, "--device", "cpu", "--no-export", "--out", str(tmp_path / "o")]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("catdog-hpo retrain: error: ") and message in err and err.count("\n") == 1, err


def test_exports_match_pytorch_and_a_failed_export_keeps_the_checkpoint(
        tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "e"
    argv = ["retrain", "--config", str(tiny["export"]), "--epochs", "1", "--device", "cpu", "--no-progress",
            "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    for fmt, name in (("torchscript", "model.ts"), ("onnx", "model.onnx")):
        assert m["exports"][fmt]["ok"] and m["exports"][fmt]["file"] == str(out / name)
        assert 0 <= m["exports"][fmt]["max_abs_diff"] < 1e-4
        assert (out / name).is_file() and f"{fmt}: {out / name} (max |logit diff| vs PyTorch" in text

    import catdog_hpo.ship.formats as formats

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(formats, "export_onnx", boom)
    assert main(argv) == 1  # written, but an export failed
    text = capsys.readouterr().out
    assert "onnx: FAILED: export failed: RuntimeError: exporter exploded" in text
    assert (out / "model.pt").is_file() and (out / "model.ts").is_file()
    assert not (out / "model.onnx").exists()  # the old model's ONNX is not left beside the new checkpoint
    m = json.loads((out / "metrics.json").read_text())
    assert m["exports"]["onnx"]["ok"] is False and m["exports"]["torchscript"]["ok"] is True
    load_checkpoint(out / "model.pt")


# --------------------------------------------------------------------------- metrics


def test_classification_report_by_hand() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 1, 0, 1, 1, 1])
    assert confusion_matrix(preds, labels, 3).tolist() == [[2, 1, 0], [0, 2, 0], [0, 1, 0]]
    r = classification_report(preds, labels, ("a", "b", "c"))
    assert r["n"] == 6 and r["accuracy"] == pytest.approx(4 / 6) == accuracy(preds, labels)
    assert r["per_class"]["a"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "support": 3}
    assert r["per_class"]["b"] == {"precision": 0.5, "recall": 1.0, "support": 2}
    assert r["per_class"]["c"] == {"precision": None, "recall": 0.0, "support": 1}  # never predicted


def test_mean_std() -> None:
    assert mean_std([0.5]) == (0.5, None)
    mean, std = mean_std([0.6, 0.8, 0.7])
    assert mean == pytest.approx(0.7) and std == pytest.approx(statistics.stdev([0.6, 0.8, 0.7]))


def test_export_file_config_is_the_trials(tiny: dict) -> None:
    assert from_dict(TrialConfig, read_mapping(tiny["export"])["config"]) == from_dict(
        TrialConfig, tiny["trial"].user_attrs["config"])


def test_test_dir_labels_follow_the_models_class_order(tmp_path: Path) -> None:
    """Folders are read in sorted order; labels are mapped to the model's order by name."""
    from catdog_hpo.data.testset import load_test_set

    test = write_test_dir(tmp_path / "t", n=3)  # cat/ and dog/
    x, y, skipped = load_test_set(test, ("dog", "cat"), 16)
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.uint8 and skipped == []
    assert y.tolist() == [1, 1, 1, 0, 0, 0]  # the cat images are class 1 of ("dog", "cat")
    with pytest.raises(UserError, match=r"expected .*/<class>/<images>, found train/ and val/"):
        write_color_folder(tmp_path / "split" / "train", n_per_class=2)
        write_color_folder(tmp_path / "split" / "val", n_per_class=2)
        load_test_set(tmp_path / "split", ("cat", "dog"), 16)


def test_other_data_is_noticed_and_not_compared(tiny: dict, tmp_path: Path) -> None:
    other = write_color_folder(tmp_path / "other", n_per_class=12, seed=9)
    lines: list[str] = []
    src = DataSource(path=str(other), val_fraction=0.25, split_seed=0)
    m = retrain(settings(tiny, tmp_path / "o", data=src, epochs=2), log=lines.append).metrics
    assert m["data"]["same_as_study"] is False and m["data"]["n_val"] == 6
    assert m["reproduction"]["comparable"] is False
    assert any(line.startswith("note: the data differ from the study's") for line in lines)
    assert not any("(identical)" in line for line in lines)
