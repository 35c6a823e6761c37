"""The small-data tricks of issue 23 (docs/tricks.md): L1 in the training loss (optim.l1), a moving
average of the weights (train.ema, engine/ema.py) and test-time flip averaging (augment.tta,
engine/tta.py), from the config's boundary through fit, a space file, export's replay, retrain,
the exported files, predict and the model card. Tiny synthetic images, 2-3 epochs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from torch import nn

from catdog_hpo.config import AugmentConfig, OptimConfig, TrainConfig, TrialConfig, from_dict, to_dict, write_mapping
from catdog_hpo.data import DataSource, ImageSet
from catdog_hpo.engine.augment import MEAN, STD, normalize_batch
from catdog_hpo.engine.ema import WeightEMA
from catdog_hpo.engine.models import build_model
from catdog_hpo.engine.regularize import with_l1
from catdog_hpo.engine.runtime import Runtime
from catdog_hpo.engine.train import fit
from catdog_hpo.engine.tta import FlipAverage, with_tta
from catdog_hpo.errors import ConfigError, UserError
from catdog_hpo.ship.formats import export_all, load_torchscript, onnx_session
from catdog_hpo.ship.model_meta import ModelMeta
from catdog_hpo.ship.predict import evaluate, load_predictor, predict
from catdog_hpo.ship.pt2 import load_pt2
from catdog_hpo.ship.trialfile import replay_config
from test_resume import config, learnable_set

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data() -> ImageSet:
    return learnable_set()


def with_keys(cfg: TrialConfig, epochs: int = 3, l1: float = 0.0, ema: float = 0.0, tta: bool = False) -> TrialConfig:
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, l1=l1),
                               train=dataclasses.replace(cfg.train, epochs=epochs, ema=ema),
                               augment=dataclasses.replace(cfg.augment, tta=tta))


def scored(cfg: TrialConfig, state: dict[str, torch.Tensor], data: ImageSet) -> float:
    """Val accuracy of ``state`` as retrain and predict score it (the flip average when augment.tta)."""
    model = build_model(cfg.model, len(data.classes), cfg.image_size)
    model.load_state_dict(state)
    meta = ModelMeta(data.classes, cfg.image_size, tuple(MEAN), tuple(STD))
    return evaluate(with_tta(model, cfg.augment.tta), data.val_x, data.val_y, meta, CPU)["accuracy"]


def abs_weights(state: dict[str, torch.Tensor]) -> float:
    return float(sum(v.abs().sum() for v in state.values() if v.is_floating_point() and v.dim() > 1))


# --------------------------------------------------------------------------- the boundary


@pytest.mark.parametrize("section, key, value, message", [
    ("train", "ema", 1.0, r"train\.ema: 1\.0 must be in \[0, 1\)"),
    ("train", "ema", -0.5, r"train\.ema: -0\.5 must be in \[0, 1\)"),
    ("augment", "tta", "yes", r"augment\.tta: expected true or false, got 'yes'"),
    ("optim", "l1", -1e-4, r"optim\.l1: -0\.0001 must be >= 0"),
])
def test_bad_values_are_refused_at_the_boundary_in_one_line(section: str, key: str, value: object,
                                                            message: str) -> None:
    with pytest.raises(ConfigError, match=message) as exc:
        from_dict(TrialConfig, {section: {key: value}})
    assert "\n" not in str(exc.value)


def test_the_keys_default_off_and_round_trip() -> None:
    cfg = TrialConfig()
    assert (cfg.optim.l1, cfg.train.ema, cfg.augment.tta) == (0.0, 0.0, False)
    on = with_keys(cfg, l1=1e-5, ema=0.99, tta=True)
    assert from_dict(TrialConfig, to_dict(on)) == on  # what export writes, retrain reads back


def test_a_space_file_searches_each_key(tmp_path: Path) -> None:
    from catdog_hpo.search.space_files import load_space
    from catdog_hpo.search.spaces import resolve

    path = tmp_path / "tricks.yaml"
    path.write_text("name: tricks\nbase: {image_size: 16}\nparams:\n"
                    "  optim.l1: {float: [1.0e-6, 1.0e-3], log: true}\n"
                    "  train.ema: {choices: [0.0, 0.9, 0.99]}\n"
                    "  augment.tta: {choices: [false, true]}\n", encoding="utf-8")
    space = load_space(str(path))
    cfg = resolve(space, optuna.trial.FixedTrial({"optim.l1": 1e-4, "train.ema": 0.99, "augment.tta": True}), {})
    assert (cfg.optim.l1, cfg.train.ema, cfg.augment.tta) == (1e-4, 0.99, True)
    path.write_text("name: bad\nparams:\n  train.ema: {float: [0.9, 1.5]}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"train\.ema"):
        load_space(str(path))


# --------------------------------------------------------------------------- L1


def test_l1_zero_is_the_plain_criterion() -> None:
    criterion = nn.CrossEntropyLoss()
    assert with_l1(criterion, list(nn.Linear(3, 2).parameters()), 0.0) is criterion  # bit for bit as before


def test_l1_raises_the_training_loss_and_shrinks_the_weights(data: ImageSet) -> None:
    plain = fit(with_keys(config()), data, CPU)
    l1 = fit(with_keys(config(), l1=1e-3), data, CPU)
    assert all(a.train_loss > b.train_loss for a, b in zip(l1.history, plain.history))
    assert abs_weights(l1.best_state) < abs_weights(plain.best_state)


# --------------------------------------------------------------------------- EMA


def test_weight_ema_follows_the_formula_and_gives_the_weights_back() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = WeightEMA(model, 0.5)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.add_(2.0)
    ema.update()  # step 1: decay min(0.5, 2 / 11)
    d = 2 / 11
    got = ema.state_dict()
    assert torch.allclose(got["0.weight"], d * start["0.weight"] + (1 - d) * (start["0.weight"] + 1))
    assert torch.allclose(got["1.running_mean"], d * start["1.running_mean"] + (1 - d) * (start["1.running_mean"] + 2))
    assert got["1.num_batches_tracked"] is not None  # integer buffers are the model's own
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied():
        assert torch.equal(model[0].weight, got["0.weight"])
    assert all(torch.equal(model.state_dict()[k], raw[k]) for k in raw)  # bit for bit


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-step"])
def test_ema_is_updated_every_step_validated_and_kept(data: ImageSet, monkeypatch: pytest.MonkeyPatch,
                                                      static: bool) -> None:
    cfg = config("sgd", "cosine", momentum=0.9)
    rt = Runtime(channels_last=True, static_step=True) if static else None
    updates = []
    original = WeightEMA.update
    monkeypatch.setattr(WeightEMA, "update", lambda self: (updates.append(1), original(self)))
    plain = fit(with_keys(cfg), data, CPU, runtime=rt)
    assert not updates  # off by default
    ema = fit(with_keys(cfg, ema=0.9), data, CPU, runtime=rt)
    assert len(updates) == 3 * (data.train_x.shape[0] // cfg.train.batch_size)  # one per optimizer step
    # the average leaves training itself alone (validation swaps it in and out, bit for bit) ...
    assert [h.train_loss for h in ema.history] == [h.train_loss for h in plain.history]
    # ... and is what validation scored and what the fit keeps
    assert scored(cfg, ema.best_state, data) == ema.best_val_acc
    assert any(not torch.equal(ema.best_state[k], plain.best_state[k]) for k in plain.best_state)
    # a completed fit leaves the average in its model (retrain on train+val keeps that model)
    model = build_model(cfg.model, len(data.classes), cfg.image_size)
    one = fit(with_keys(cfg, epochs=1, ema=0.9), data, CPU, runtime=rt, model=model)
    assert all(torch.equal(v.cpu(), one.best_state[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- TTA


def test_flip_average_is_the_mean_of_image_and_mirror() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(2, 3, 6, 8)
    want = (net(x) + net(x[..., torch.arange(7, -1, -1)])) / 2
    assert torch.allclose(FlipAverage(net)(x), want)
    assert with_tta(net, False) is net


def test_tta_changes_validation_only_and_scores_as_retrain_does(data: ImageSet) -> None:
    cfg = config()
    plain = fit(with_keys(cfg, epochs=2), data, CPU)
    tta = fit(with_keys(cfg, epochs=2, tta=True), data, CPU)
    assert [h.train_loss for h in tta.history] == [h.train_loss for h in plain.history]
    assert [h.val_loss for h in tta.history] != [h.val_loss for h in plain.history]
    assert scored(with_keys(cfg, tta=True), tta.best_state, data) == tta.best_val_acc


def test_the_inference_costs_count_both_forwards_of_tta_and_training_one() -> None:
    """A TTA config ships two forwards per image: the flops objective and --max-flops count both, the
    latency objective times the flip-averaged model; the recorded FLOPS stays one forward of the
    network, what the training cost model prices (training never flips)."""
    from catdog_hpo.engine.cost import workload
    from catdog_hpo.engine.models import model_cost
    from catdog_hpo.search.limits import Limits, check_cost
    from catdog_hpo.search.record import TrialKey
    from catdog_hpo.search.trial import Goal, _costs

    plain, tta = with_keys(config()), with_keys(config(), tta=True)
    one = model_cost(plain.model, 2, plain.image_size).flops
    costs = {cfg.augment.tta: check_cost(cfg, 2, Limits()) for cfg in (plain, tta)}
    assert [costs[t][TrialKey.FLOPS] for t in (False, True)] == [one, one]
    assert [costs[t][TrialKey.INFERENCE_FLOPS] for t in (False, True)] == [one, 2 * one]
    check_cost(plain, 2, Limits(max_flops=one))
    with pytest.raises(ConfigError, match=f"{2 * one:,} FLOPs per image \\(2 forwards of {one:,}: augment.tta\\) > --max-flops"):
        check_cost(tta, 2, Limits(max_flops=one))
    train = [workload(cfg, costs[cfg.augment.tta][TrialKey.FLOPS], 1, 2, 64, 16) for cfg in (plain, tta)]
    assert [(w.flops, w.val_passes) for w in train] == [(one, 1), (one, 2)]  # training: one forward either way
    from catdog_hpo.engine.tta import describe_flops  # retrain's and train's "model:" line

    assert describe_flops(plain, one) == f"{one / 1e6:,.1f} MFLOPs/image"
    assert describe_flops(tta, one) == f"{2 * one / 1e6:,.1f} MFLOPs/image (2 forwards of {one / 1e6:,.1f}: augment.tta)"

    goal = Goal(objectives=("accuracy", "flops", "latency"))
    for cfg in (plain, tta):
        trial = optuna.create_study(directions=["maximize", "minimize", "minimize"]).ask()
        got = _costs(trial, cfg, 2, costs[cfg.augment.tta], CPU, goal)
        assert got["flops"] == (2 * one if cfg.augment.tta else one)
        flipped = "test-time flip averaging (2 network forwards)" in trial.user_attrs[TrialKey.LATENCY_METHOD]
        assert flipped == cfg.augment.tta and got["latency"] == trial.user_attrs[TrialKey.LATENCY_MS] > 0


# --------------------------------------------------------------------------- the files and predict


@pytest.fixture(scope="module")
def tta_files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One model as a checkpoint with augment.tta, a plain checkpoint, and its three TTA exports."""
    from catdog_hpo.ship.checkpoint import save_checkpoint
    from catdog_hpo.ship.retrain import FORMATS

    from test_predict import CFG, CLASSES, SIZE

    tmp = tmp_path_factory.mktemp("tta")
    cfg = with_keys(CFG, tta=True)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(CLASSES), SIZE).eval()
    save_checkpoint(tmp / "tta.pt", model.state_dict(), cfg, CLASSES, {})
    save_checkpoint(tmp / "plain.pt", model.state_dict(), CFG, CLASSES, {})
    meta = ModelMeta(CLASSES, SIZE, tuple(MEAN), tuple(STD), tta=True)
    batch = normalize_batch(torch.randint(0, 256, (8, 3, SIZE, SIZE), dtype=torch.uint8))
    results = export_all(with_tta(model, True), batch, tmp, meta, FORMATS)
    assert all(r.ok for r in results), [r.line() for r in results]
    return {"tmp": tmp, "meta": meta, "classes": CLASSES}


def test_exported_files_hold_the_flip_average_and_predict_agrees(tta_files: dict, tmp_path: Path) -> None:
    from test_predict import write_varied_images

    tmp = tta_files["tmp"]
    assert onnx_session(tmp / "model.onnx")[1].tta and load_torchscript(tmp / "model.ts")[1].tta
    assert load_pt2(tmp / "model.pt2")[1] == tta_files["meta"]
    assert ModelMeta.from_json('{"format": "catdog-hpo-model", "format_version": 1, "classes": ["a", "b"], '
                               '"image_size": 8, "mean": [0, 0, 0], "std": [1, 1, 1]}', "old").tta is False
    images = write_varied_images(tmp_path / "imgs", np.random.default_rng(5))
    probs = {}
    for name in ("tta.pt", "plain.pt", "model.ts", "model.onnx", "model.pt2"):
        rows = predict(load_predictor(tmp / name, CPU), images)
        probs[name] = torch.tensor([[r.probabilities[c] for c in tta_files["classes"]] for r in rows])
    for name in ("model.ts", "model.onnx", "model.pt2"):
        assert (probs[name] - probs["tta.pt"]).abs().max() < 1e-5, name  # the file's graph = the config's wrap
    assert (probs["plain.pt"] - probs["tta.pt"]).abs().max() > 1e-4  # and it is not the plain network


def test_retrain_scores_exports_and_cards_the_tricks(tmp_path: Path) -> None:
    """retrain of a config with EMA and TTA: its val score is the fit's, its files carry the flip
    average, and the card says so."""
    from catdog_hpo.ship.retrain import RetrainSettings, retrain

    from test_export import write_color_folder

    folder = write_color_folder(tmp_path / "data", n_per_class=16)
    cfg = TrialConfig(image_size=16, model=config().model, augment=AugmentConfig(crop="pad", tta=True),
                      optim=OptimConfig(scheduler="none", l1=1e-5), train=TrainConfig(epochs=2, batch_size=8, ema=0.9))
    write_mapping(tmp_path / "cfg.yaml", to_dict(cfg))
    done = retrain(RetrainSettings(config=tmp_path / "cfg.yaml", out=tmp_path / "out", studies_dir=tmp_path / "studies",
                                   data=DataSource(path=str(folder), val_fraction=0.25, split_seed=0)),
                   log=lambda _line: None)
    m = done.metrics
    assert all(r.ok for r in done.exports), [r.line() for r in done.exports]
    # retrain scores the kept (EMA) weights as fit validated them (with the flip average)
    assert m["val"]["accuracy"] == m["seeds"][0]["best_val_acc"]
    assert onnx_session(done.out / "model.onnx")[1].tta
    card = (done.out / "MODEL_CARD.md").read_text()
    assert "flip averaging is inside model.ts, model.onnx and model.pt2" in card
    # the card's cost is the files': two forwards of the network per image, timed together
    assert m["inference_flops"] == 2 * m["flops"] and "flip averaging" in m["latency"]["method"]
    assert f"{m['inference_flops']:,} FLOPs per image as shipped (2 forwards of {m['flops']:,}: flip averaging)" in card
    assert "moving average of the weights (decay 0.9 per step)" in card


# --------------------------------------------------------------------------- replay of old studies

SPACE = "name: old\nbase: {image_size: 16, train: {epochs: 2}}\nparams:\n  optim.lr: {float: [1.0e-3, 1.0e-2], log: true}\n"


def old_trial(tmp_path: Path, lr: float, recorded: dict) -> tuple[optuna.Study, optuna.trial.FrozenTrial]:
    """An in-memory study as run records it: one trial with ``lr``, its config as ``recorded``."""
    (tmp_path / "old.yaml").write_text(SPACE, encoding="utf-8")
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("space", str(tmp_path / "old.yaml"))
    study.enqueue_trial({"optim.lr": lr})
    trial = study.ask({"optim.lr": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True)})
    trial.set_user_attr("config", recorded)
    study.tell(trial, 0.75)
    return study, study.trials[0]


def recorded_before_the_keys(lr: float) -> dict:
    """What a study run before optim.l1, train.ema and augment.tta existed recorded."""
    cfg = to_dict(TrialConfig(image_size=16, optim=OptimConfig(lr=lr), train=TrainConfig(epochs=2)))
    del cfg["optim"]["l1"], cfg["train"]["ema"], cfg["augment"]["tta"]
    return cfg


def test_a_study_recorded_before_the_new_keys_still_replays(tmp_path: Path) -> None:
    study, trial = old_trial(tmp_path, 2e-3, recorded_before_the_keys(lr=2e-3))
    cfg = replay_config(study, trial)
    assert cfg.optim.lr == 2e-3 and (cfg.optim.l1, cfg.train.ema, cfg.augment.tta) == (0.0, 0.0, False)


def test_a_recorded_config_that_no_longer_reads_is_one_line(tmp_path: Path) -> None:
    recorded = recorded_before_the_keys(lr=2e-3)
    recorded["train"]["swa"] = True  # a key this version does not know
    study, trial = old_trial(tmp_path, 2e-3, recorded)
    with pytest.raises(UserError, match=r"its recorded config\.train: unknown key 'swa'") as exc:
        replay_config(study, trial)
    assert "\n" not in str(exc.value)
