"""Model builder: shapes across the family, feasibility checks, cost, ResNet-18 weights."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from catdog_hpo.config import BlockConfig, ModelConfig
from catdog_hpo.errors import ConfigError, UserError
from catdog_hpo.engine.models import (
    ACTIVATIONS,
    FAMILIES,
    HEADS,
    POOLS,
    build_model,
    check_model,
    model_cost,
)
from catdog_hpo import config as config_module


def _cnn(depth: int, kernel: int = 3, convs: int = 1, **kw) -> ModelConfig:
    blocks = tuple(BlockConfig(channels=4 + 2 * i, kernel_size=kernel, convs=convs) for i in range(depth))
    kw.setdefault("fc_hidden", 16)
    return ModelConfig(blocks=blocks, **kw)


def _forward(model: nn.Module, batch: int, size: int) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, 3, size, size))


def test_registries_match_config_choices() -> None:
    assert set(FAMILIES) == set(config_module.FAMILIES)
    assert set(ACTIVATIONS) == set(config_module.ACTIVATIONS)
    assert set(POOLS) == set(config_module.POOLS)
    assert set(HEADS) == set(config_module.HEADS)


# depth x kernel x convs x bn x head over image sizes the depth allows
SHAPE_CASES = [
    (depth, kernel, convs, bn, head, size)
    for depth, kernel, convs, bn, head in itertools.product(range(1, 7), (1, 3, 5, 7), (1, 2), (True, False), ("gap", "fc"))
    for size in (2 ** depth, 24, 33)
    if size >= 2 ** depth and (kernel + convs + depth + bn) % 2 == 0  # a spread-out half of the grid
]


@pytest.mark.parametrize("depth,kernel,convs,bn,head,size", SHAPE_CASES)
def test_cnn_output_shape(depth: int, kernel: int, convs: int, bn: bool, head: str, size: int) -> None:
    cfg = _cnn(depth, kernel, convs, batch_norm=bn, head=head)
    classes = 2 + 3 * (depth % 2)  # 2 and 5 classes
    out = _forward(build_model(cfg, classes, size), 2, size)
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("pool", sorted(POOLS))
@pytest.mark.parametrize("head", sorted(HEADS))
def test_activation_pool_head(activation: str, pool: str, head: str) -> None:
    cfg = _cnn(3, activation=activation, pool=pool, head=head, dropout=0.2)
    model = build_model(cfg, 5, 16)
    assert any(isinstance(m, type(ACTIVATIONS[activation]())) for m in model.modules())
    assert any(isinstance(m, type(POOLS[pool]())) for m in model.modules())
    out = _forward(model, 3, 16)
    assert out.shape == (3, 5)


def test_seed_cnn_defaults() -> None:
    model = build_model(ModelConfig(), 2, 64)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(128 * 8 * 8, 512), (512, 2)]
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.modules())


def test_fc_head_without_hidden_layer() -> None:
    model = build_model(_cnn(2, head="fc", fc_hidden=0), 2, 16)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(6 * 4 * 4, 2)]


@pytest.mark.parametrize("depth,size", [(4, 8), (6, 32), (2, 2), (1, 1)])
def test_too_many_blocks_rejected(depth: int, size: int) -> None:
    cfg = _cnn(depth)
    with pytest.raises(ConfigError, match=rf"{depth} blocks need a larger image than {size} px"):
        check_model(cfg, size)
    with pytest.raises(ConfigError, match="blocks"):
        build_model(cfg, 2, size)
    with pytest.raises(ConfigError, match="blocks"):
        model_cost(cfg, 2, size)


def test_deepest_feasible_is_accepted() -> None:
    check_model(_cnn(3), 8)  # 8 -> 4 -> 2 -> 1
    check_model(_cnn(6), 64)
    check_model(_cnn(3), 9)  # pooling rounds down: 9 -> 4 -> 2 -> 1


def test_other_infeasible_configs_rejected() -> None:
    with pytest.raises(ConfigError, match="image_size: 24 px is too small for resnet18"):
        check_model(ModelConfig(family="resnet18"), 24)
    with pytest.raises(ConfigError, match="freeze_backbone"):
        check_model(ModelConfig(family="resnet18", freeze_backbone=True), 64)
    with pytest.raises(ConfigError, match="model.pretrained: applies to families resnet18, efficientnet_lite0 only"):
        check_model(ModelConfig(pretrained=True), 64)
    with pytest.raises(ConfigError, match="num_classes: 1"):
        build_model(_cnn(2), 1, 16)
    with pytest.raises(ConfigError, match="family"):
        check_model(ModelConfig(family="vit"), 64)


@pytest.mark.parametrize("cfg,size", [
    (_cnn(1), 8), (_cnn(3, kernel=5, convs=2, head="gap"), 32), (_cnn(2, batch_norm=False), 17),
    (ModelConfig(), 64), (ModelConfig(family="resnet18", fc_hidden=0), 32),
])
def test_params_match_built_model(cfg: ModelConfig, size: int) -> None:
    model = build_model(cfg, 3, size)
    assert model_cost(cfg, 3, size).params == sum(p.numel() for p in model.parameters())


def test_flops_hand_count() -> None:
    # 16 px; block 1: 3->4 channels 3x3, 16x16 out; pool -> 8; block 2: 4->8 channels 1x1 (x2 convs), 8x8 out;
    # pool -> 4; fc head: 8*4*4=128 -> 10 -> 2.
    cfg = ModelConfig(blocks=(BlockConfig(4, 3, 1), BlockConfig(8, 1, 2)), head="fc", fc_hidden=10)
    macs = (16 * 16 * 4 * 3 * 3 * 3) + (8 * 8 * 8 * 4 * 1 * 1) + (8 * 8 * 8 * 8 * 1 * 1) + 128 * 10 + 10 * 2
    assert model_cost(cfg, 2, 16).flops == 2 * macs


def test_resnet18_flops_match_published() -> None:
    # torchvision lists ResNet-18 at 1.81 GFLOPS in its (multiply-add) convention at 224 px.
    gmacs = model_cost(ModelConfig(family="resnet18", fc_hidden=0), 2, 224).flops / 2e9
    assert 1.80 < gmacs < 1.83


@pytest.mark.parametrize("size,hidden", [(32, 0), (40, 64)])
def test_resnet18_from_scratch(size: int, hidden: int) -> None:
    model = build_model(ModelConfig(family="resnet18", fc_hidden=hidden, dropout=0.1), 5, size)
    assert _forward(model, 2, size).shape == (2, 5)
    assert all(p.requires_grad for p in model.parameters())


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    from torchvision.models import resnet18

    state = resnet18(weights=None).state_dict()  # 1000-class head: dropped on load
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(state, path)
    return path, state


def test_resnet18_weights_file(resnet_weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, state = resnet_weights
    model = build_model(ModelConfig(family="resnet18", weights_file=str(path), fc_hidden=0), 2, 32)
    loaded = model.state_dict()
    for key in ("conv1.weight", "layer4.1.bn2.running_var", "layer2.0.downsample.0.weight"):
        assert torch.equal(loaded[key], state[key])
    assert loaded["fc.1.weight"].shape == (2, 512)


def test_freeze_backbone(resnet_weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = resnet_weights
    cfg = ModelConfig(family="resnet18", weights_file=str(path), freeze_backbone=True, fc_hidden=32)
    model = build_model(cfg, 2, 32)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.0.weight", "fc.0.bias", "fc.3.weight", "fc.3.bias"}


def test_weights_file_errors(tmp_path: Path, resnet_weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match="nope.pth.*no such file"):
        build_model(ModelConfig(family="resnet18", weights_file=str(missing)), 2, 32)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "junk": torch.zeros(1)}, wrong)
    with pytest.raises(UserError, match=r"wrong.pth.*not a ResNet-18 state dict \(missing key"):
        build_model(ModelConfig(family="resnet18", weights_file=str(wrong)), 2, 32)
    _, state = resnet_weights
    bad_shape = dict(state, **{"conv1.weight": torch.zeros(64, 3, 5, 5)})
    shaped = tmp_path / "shaped.pth"
    torch.save(bad_shape, shaped)
    with pytest.raises(UserError, match=r"shaped.pth.*does not fit ResNet-18"):
        build_model(ModelConfig(family="resnet18", weights_file=str(shaped)), 2, 32)
    text = tmp_path / "text.pth"
    text.write_text("not a tensor file")
    with pytest.raises(UserError, match="text.pth.*not a PyTorch state dict"):
        build_model(ModelConfig(family="resnet18", weights_file=str(text)), 2, 32)


def test_pretrained_download_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models import ResNet18_Weights

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(type(ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(UserError) as info:
        build_model(ModelConfig(family="resnet18", pretrained=True), 2, 32)
    message = str(info.value)
    assert "\n" not in message and "weights_file" in message and "name resolution" in message
