"""`catdog-hpo export`: picking the trial, replaying it through the space, the file, the errors.

A real (tiny) study is run in-process by the lead's `search.run.run` on a folder of small PNGs with a
space file of its own, so the export replays real parameters; studies from tests/study_factory.py
cover the error cases. The helpers here are reused by test_retrain.py.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import optuna
import pytest
from PIL import Image

from catdog_hpo.cli import main
from catdog_hpo.config import FORMAT_VERSION, TrialConfig, from_dict, load_trial_config, read_mapping
from catdog_hpo.errors import UserError
from catdog_hpo.ship.config_diff import first_difference
from catdog_hpo.ship.trialfile import ExportSettings, export_trial, pick_trial, replay_config
from study_factory import make_study

TINY_SPACE = """\
name: tiny
base:
  image_size: 16
  model: {family: cnn, head: gap, dropout: 0.0}
  augment: {crop: pad, strength: 0.5}
  optim: {scheduler: none}
  train: {epochs: 2, batch_size: 16}
blocks:
  depth: 1
  channels: {choices: [4, 8]}
  kernel_size: 3
params:
  optim.name: {choices: [adam, sgd]}
  optim.lr: {float: [3.0e-3, 3.0e-2], log: true}
  optim.momentum: {float: [0.8, 0.95], when: {optim.name: [sgd]}}
"""
CLASSES = ("cat", "dog")


def color_image(label: int, rng: np.random.Generator, size: tuple[int, int] = (20, 20)) -> Image.Image:
    """Noise with a class colour: cats lean red, dogs lean blue (learnable in a few steps)."""
    w, h = size
    x = rng.integers(0, 150, (h, w, 3)).astype(np.int32)
    x[..., 0 if label == 0 else 2] += 100
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), "RGB")


def write_color_folder(root: Path, n_per_class: int = 24, seed: int = 0, classes: tuple[str, ...] = CLASSES) -> Path:
    """ImageFolder layout root/<class>/*.png (flat: the run splits it by val_fraction)."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            color_image(label, rng).save(root / name / f"{i:03d}.png")
    return root


def make_tiny_study(tmp: Path, trials: int = 3, name: str = "tiny", space_text: str = TINY_SPACE,
                    enqueue: tuple[dict, ...] = ()) -> dict:
    """Run a real study (random sampler, 2 epochs) on tiny PNGs; return where everything is."""
    from catdog_hpo.data import DataSource
    from catdog_hpo.search.run import run
    from catdog_hpo.search.settings import RunSettings

    data = write_color_folder(tmp / "data")
    space = tmp / "tiny_space.yaml"
    space.write_text(space_text, encoding="utf-8")
    storage = f"sqlite:///{tmp / 'studies' / 'catdog.db'}"
    settings = RunSettings(study=name, storage=storage, space=str(space), sampler="random", pruner="none",
                           trials=trials, data=DataSource(path=str(data), val_fraction=0.25, split_seed=0),
                           seed=0, studies_dir=tmp / "studies", progress=False, enqueue=enqueue)
    old = signal.getsignal(signal.SIGTERM)  # run() installs its own SIGTERM handler
    try:
        assert run(settings) == 0
    finally:
        signal.signal(signal.SIGTERM, old)
    return {"storage": storage, "study": name, "space": space, "data": data, "studies": tmp / "studies"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_tiny_study(tmp_path_factory.mktemp("tiny"))


def load(tiny: dict) -> optuna.Study:
    return optuna.load_study(study_name=tiny["study"], storage=tiny["storage"])


# --------------------------------------------------------------------------- the happy path


def test_export_best_trial_writes_a_file_retrain_can_read(tiny: dict, tmp_path: Path) -> None:
    study = load(tiny)
    best = max((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    done = export_trial(ExportSettings(study=tiny["study"], storage=tiny["storage"], studies_dir=tmp_path))
    assert done.path == tmp_path / "exports" / f"tiny-trial{best.number}.yaml"
    doc = read_mapping(done.path)
    assert doc["format_version"] == FORMAT_VERSION
    assert doc["study"] == "tiny" and doc["trial"] == {"number": best.number, "id": best._trial_id}
    assert doc["params"] == best.params
    # The config section is the trial's recorded config, and load_trial_config reads the file as is.
    assert doc["config"] == best.user_attrs["config"]
    assert load_trial_config(done.path) == from_dict(TrialConfig, best.user_attrs["config"])
    assert done.config.train.seed == 0 and doc["seed"] == 0
    src = doc["data"]["source"]
    assert src["path"] == str(tiny["data"]) and src["val_fraction"] == 0.25 and src["split_seed"] == 0
    assert doc["data"]["fingerprint"] == study.user_attrs["data_fingerprint"]
    assert doc["data"]["fingerprint_image_size"] == 16
    m = doc["metrics"]
    assert m["value"] == best.value and m["history"] == best.user_attrs["history"]
    assert m["best_epoch"] == best.user_attrs["best_epoch"] and m["n_params"] == best.user_attrs["n_params"]
    assert set(doc["versions"]) == {"catdog-hpo", "torch", "torchvision", "optuna", "python"}
    assert doc["versions"]["optuna"] == optuna.__version__
    assert done.command == f"catdog-hpo retrain --config {done.path}"


def test_export_chosen_trial_as_json(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "t1.json"
    done = export_trial(ExportSettings(study="tiny", storage=tiny["storage"], trial=1, out=out))
    doc = json.loads(out.read_text())
    assert done.trial.number == 1 and doc["trial"]["number"] == 1
    assert doc["config"] == load(tiny).trials[1].user_attrs["config"]
    assert load_trial_config(out).optim.name == load(tiny).trials[1].params["optim.name"]


def test_export_cli_prints_the_retrain_command(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--study", "tiny", "--storage", tiny["storage"], "--trial", "0"]) == 0
    out = capsys.readouterr().out
    assert "exported trial 0 of study 'tiny'" in out
    assert "catdog-hpo retrain --config studies/exports/tiny-trial0.yaml" in out
    assert (tmp_path / "studies/exports/tiny-trial0.yaml").is_file()


def test_replay_uses_the_space_not_a_copy(tiny: dict) -> None:
    """Editing the space file changes what replay gives: export notices and names the key."""
    study = load(tiny)
    trial = pick_trial(study, None)
    original = tiny["space"].read_text()
    try:
        tiny["space"].write_text(original.replace("dropout: 0.0", "dropout: 0.25"))
        with pytest.raises(UserError, match=r"model\.dropout = 0\.25, but the trial ran with 0\.0"):
            replay_config(study, trial)
        tiny["space"].write_text(original.replace("optim.name: {choices: [adam, sgd]}",
                                                  "optim.name: {choices: [adam, sgd]}\n  optim.weight_decay: {float: [0.0, 0.1]}"))
        with pytest.raises(UserError, match=r"does not replay through space .*'optim.weight_decay' is not found"):
            replay_config(study, trial)
        tiny["space"].unlink()
        with pytest.raises(UserError, match=r"cannot load its search space"):
            replay_config(study, trial)
    finally:
        tiny["space"].write_text(original)
    assert replay_config(study, trial) == from_dict(TrialConfig, trial.user_attrs["config"])


# --------------------------------------------------------------------------- errors


@pytest.fixture()
def factory_store(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    make_study(url, "mixed", n_complete=2, n_pruned=1, n_failed=1, n_rejected=0)
    make_study(url, "nothing-done", n_complete=0, n_pruned=1, n_failed=1, n_rejected=1)
    return url


def test_unknown_study_lists_the_names(factory_store: str) -> None:
    with pytest.raises(UserError, match=r"no study named 'nope' .*\(studies: mixed, nothing-done\)"):
        export_trial(ExportSettings(study="nope", storage=factory_store))


def test_study_without_completed_trial(factory_store: str) -> None:
    with pytest.raises(UserError, match=r"'nothing-done' has no completed trial yet \(") as exc:
        export_trial(ExportSettings(study="nothing-done", storage=factory_store))
    assert "2 pruned" in str(exc.value) and "1 failed" in str(exc.value)  # rejected trials are pruned


def test_trial_that_does_not_exist_or_did_not_complete(factory_store: str) -> None:
    with pytest.raises(UserError, match=r"--trial 99: study 'mixed' has no trial 99 \(trials: 0 to 3\)"):
        export_trial(ExportSettings(study="mixed", storage=factory_store, trial=99))
    study = optuna.load_study(study_name="mixed", storage=factory_store)
    for t in study.trials:
        if t.state.name in ("PRUNED", "FAIL"):
            state = {"PRUNED": "pruned", "FAIL": "failed"}[t.state.name]
            with pytest.raises(UserError, match=rf"--trial {t.number}: the trial is {state}, not complete"):
                export_trial(ExportSettings(study="mixed", storage=factory_store, trial=t.number))


def test_params_that_do_not_fit_the_space(factory_store: str) -> None:
    # The factory's parameters ("model.width", ...) are not the seed-cnn space's ("depth", ...).
    with pytest.raises(UserError, match=r"does not replay through space 'seed-cnn'.*the space changed"):
        export_trial(ExportSettings(study="mixed", storage=factory_store))


def test_cli_errors_are_one_line(factory_store: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", "--study", "nope", "--storage", factory_store]) == 2
    err = capsys.readouterr().err
    assert err.startswith("catdog-hpo export: error: no study named 'nope'") and err.count("\n") == 1
    assert main(["export", "--study", "mixed", "--storage", factory_store, "--out", str(tmp_path / "x.txt")]) == 2
    assert "must end in .yaml, .yml, .json" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path / 'absent.db'}"
    assert main(["export", "--study", "mixed", "--storage", missing]) == 2
    assert "no study store at" in capsys.readouterr().err
    assert not (tmp_path / "absent.db").exists()


def test_first_difference() -> None:
    assert first_difference({"a": {"b": [1, 2]}}, {"a": {"b": [1, 2]}}) is None
    assert first_difference({"a": {"b": [1, 2]}}, {"a": {"b": [1, 3]}}) == ("a.b[1]", 2, 3)
    assert first_difference({"a": 1}, {"a": 1, "c": 2}) == ("c", "(missing)", 2)
    assert first_difference({"a": True}, {"a": 1}) == ("a", True, 1)


# --------------------------------------------------------------------------- issue 23: new knobs, resnet

KNOBS_SPACE = """\
name: knobs
base:
  image_size: 16
  model: {head: gap, dropout: 0.0}
  augment: {crop: none}
  optim: {scheduler: none}
  train: {epochs: 1, batch_size: 16}
blocks:
  depth: 2
  channels: 4
  stride: {choices: [1, 2]}
  padding: {choices: [same, valid]}
stages:
  depth: {int: [1, 2]}
  channels: {choices: [4, 8]}
  stride: {choices: [1, 2]}
params:
  model.family: {choices: [cnn, resnet]}
  model.activation: {choices: [relu, prelu, tanh]}
  model.init: {choices: [kaiming_uniform, xavier_normal, pytorch]}
  optim.l1: {float: [0.0, 1.0e-4]}
  optim.lr: {float: [3.0e-3, 3.0e-2], log: true}
"""
# One trial of each family with the new knobs: a strided 'valid' block and PReLU; a two-stage
# ResNet with tanh.
KNOBS_TRIALS = (
    {"block0.stride": 2, "block0.padding": "valid", "block1.stride": 1, "block1.padding": "same", "stages": 1,
     "stage0.channels": 4, "stage0.stride": 2, "model.family": "cnn", "model.activation": "prelu",
     "model.init": "xavier_normal", "optim.l1": 1.0e-5, "optim.lr": 1.0e-2},
    {"block0.stride": 1, "block0.padding": "same", "block1.stride": 1, "block1.padding": "same", "stages": 2,
     "stage0.channels": 4, "stage0.stride": 1, "stage1.channels": 8, "stage1.stride": 2, "model.family": "resnet",
     "model.activation": "tanh", "model.init": "kaiming_uniform", "optim.l1": 0.0, "optim.lr": 1.0e-2},
)


@pytest.fixture(scope="module")
def knobs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_tiny_study(tmp_path_factory.mktemp("knobs"), trials=2, name="knobs", space_text=KNOBS_SPACE,
                           enqueue=KNOBS_TRIALS)


@pytest.mark.parametrize("number,family", [(0, "cnn"), (1, "resnet")])
def test_new_knobs_export_train_and_retrain_in_every_format(knobs: dict, tmp_path: Path, number: int,
                                                             family: str) -> None:
    """export replays the params through the space; train and retrain read the file; retrain
    writes TorchScript, ONNX and pt2 files that match PyTorch."""
    done = export_trial(ExportSettings(study="knobs", storage=knobs["storage"], trial=number, out=tmp_path / "t.yaml"))
    cfg = load_trial_config(done.path)
    assert cfg == done.config and cfg.model.family == family
    assert cfg.model.blocks[0].stride == (2 if family == "cnn" else 1) and len(cfg.model.stages) == number + 1
    assert cfg.model.activation == ("prelu" if family == "cnn" else "tanh")
    assert main(["train", "--config", str(done.path), "--data", str(knobs["data"]), "--val-fraction", "0.25",
                 "--device", "cpu", "--no-progress", "--out", str(tmp_path / "train")]) == 0
    assert (tmp_path / "train" / "best.pt").is_file()
    out = tmp_path / "retrain"
    assert main(["retrain", "--config", str(done.path), "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    exports = json.loads((out / "metrics.json").read_text())["exports"]
    for fmt in ("torchscript", "onnx", "pt2"):
        assert exports[fmt]["ok"] and exports[fmt]["max_abs_diff"] < 1e-4, (fmt, exports[fmt])
