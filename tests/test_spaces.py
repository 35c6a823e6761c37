"""Search spaces: parsing, validation errors, conditionals, the grid, replay."""

from __future__ import annotations

from pathlib import Path

import pytest
from optuna.trial import FixedTrial

from catdog_hpo.config import TrialConfig
from catdog_hpo.errors import ConfigError, UserError
from catdog_hpo.search.space_files import builtin_spaces, load_space, parse_space
from catdog_hpo.search.spaces import grid_points, resolve

SMALL = {
    "name": "small",
    "base": {"image_size": 16, "train": {"epochs": 1}},
    "blocks": {"depth": {"int": [1, 3]}, "channels": {"choices": [8, 16]}, "kernel_size": 3},
    "params": {
        "optim.name": {"choices": ["adam", "sgd"]},
        "optim.momentum": {"float": [0.8, 0.99], "when": {"optim.name": ["sgd"]}, "grid": [0.9]},
        "optim.lr": {"float": [1e-4, 1e-1], "log": True, "grid": [1e-3, 1e-2]},
    },
}


def test_builtin_spaces_load_and_resolve() -> None:
    assert {"seed-cnn", "resnet18", "quick", "resnet-scratch"} <= set(builtin_spaces())
    for name in builtin_spaces():
        space = load_space(name)
        cfg = resolve(space, FixedTrial(grid_points(space)[0]))
        assert isinstance(cfg, TrialConfig)


def test_conditional_block_params_exist_only_for_existing_blocks() -> None:
    space = parse_space(SMALL, "small", "small.yaml")
    cfg = resolve(space, FixedTrial({"depth": 2, "block0.channels": 8, "block1.channels": 16,
                                     "optim.name": "adam", "optim.lr": 0.01}))
    assert [b.channels for b in cfg.model.blocks] == [8, 16]
    assert all(b.kernel_size == 3 for b in cfg.model.blocks)
    assert cfg.optim.name == "adam" and cfg.optim.lr == 0.01


def test_grid_has_no_duplicates_and_respects_conditions() -> None:
    space = parse_space(SMALL, "small", "small.yaml")
    points = grid_points(space)
    # depth d has 2**d channel combos; optimizer adam (1 lr point x2) or sgd (x2, momentum fixed)
    assert len(points) == (2 + 4 + 8) * 2 * 2
    assert len({tuple(sorted(p.items())) for p in points}) == len(points)
    for p in points:
        assert ("optim.momentum" in p) == (p["optim.name"] == "sgd")
        assert all(f"block{i}.channels" in p for i in range(p["depth"]))
        assert f"block{p['depth']}.channels" not in p


def test_grid_points_replay_through_fixed_trial() -> None:
    space = parse_space(SMALL, "small", "small.yaml")
    for p in grid_points(space)[:10]:
        resolve(space, FixedTrial(p))  # every grid point names exactly the params the space asks


def test_overrides_apply_last() -> None:
    space = parse_space(SMALL, "small", "small.yaml")
    cfg = resolve(space, FixedTrial(grid_points(space)[0]), {"train.epochs": 7, "train.seed": 3})
    assert cfg.train.epochs == 7 and cfg.train.seed == 3


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"params": {"optim.nope": {"float": [0, 1]}}}, "params.optim.nope: unknown config key"),
        ({"params": {"optim.lr": {"float": [1.0, 0.1]}}}, "params.optim.lr: low 1.0 > high 0.1"),
        ({"params": {"optim.lr": {"float": [0.0, 0.1], "log": True}}}, "log scale needs low > 0"),
        ({"params": {"optim.name": {"choices": []}}}, "params.optim.name: choices: must be a non-empty list"),
        ({"params": {"optim.lr": {"float": [0.1, 1], "int": [1, 2]}}}, "give exactly one of"),
        ({"params": {"optim.lr": {"float": [0.1, 1], "grid": [5]}}}, "grid value 5 is outside"),
        ({"params": {"optim.lr": {"float": [0.1, 1], "bogus": 1}}}, "unknown key 'bogus'"),
        ({"params": {"optim.momentum": {"float": [0.1, 1], "when": {"optim.zzz": ["sgd"]}}}}, "is not a parameter defined above"),
        ({"base": {"optim": {"lr": "fast"}}}, "lr: expected a number"),
        ({"blocks": {"depth": {"int": [1, 9]}}}, "blocks.depth: must be whole numbers from 1 to 6"),
        ({"blocks": {"depth": 2, "width": 3}}, "blocks.width: unknown key"),
        ({"extra": 1}, "unknown key 'extra'"),
        ({"blocks": {"depth": 2, "stride": {"choices": [1, 0]}}}, "blocks.stride: value 0: block.stride: 0 must be >= 1"),
        ({"blocks": {"depth": 2, "padding": {"choices": ["same", "full"]}}}, "blocks.padding: value 'full'"),
        ({"stages": {"depth": {"int": [1, 7]}}}, "stages.depth: must be whole numbers from 1 to 6"),
        ({"stages": {"channels": 8}}, "stages: needs depth"),
        ({"stages": {"depth": 2, "kernel_size": 3}}, "stages.kernel_size: unknown key (known: depth, channels, blocks, stride)"),
        ({"stages": {"depth": 2, "blocks": {"int": [0, 2]}}}, "stages.blocks: value 0: stage.blocks: 0 must be >= 1"),
        ({"params": {"model.stages": {"choices": [1]}}}, "params.model.stages: unknown config key"),
        ({"params": {"model.init": {"choices": ["kaiming_normal", "lecun"]}}}, "'lecun' is not one of"),
        ({"params": {"optim.l1": {"float": [-1.0e-4, 1.0e-4]}}}, "params.optim.l1: value -0.0001"),
        ({"params": {"optim.name": {"choices": ["adam", "nadam"]}}}, "'nadam' is not one of"),
    ],
)
def test_bad_space_names_file_and_key(tmp_path: Path, patch: dict, message: str) -> None:
    import yaml

    data = {**SMALL, **patch}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_space(str(path))
    text = str(info.value)
    assert str(path) in text and message in text
    assert "\n" not in text


def test_grid_too_large_is_refused() -> None:
    data = {"params": {f"optim.{k}": {"float": [0.0, 0.9], "grid": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]}
                       for k in ("momentum", "gamma", "label_smoothing")},
            "blocks": {"depth": 3, "channels": {"choices": [8, 16, 32, 64, 128, 256]}}}
    space = parse_space(data, "big", "big.yaml")
    with pytest.raises(ConfigError, match="more than 10,000 points"):
        grid_points(space)


def test_float_without_grid_values_is_an_error_for_grid_only() -> None:
    data = {"params": {"optim.lr": {"float": [1e-4, 1e-1], "log": True}}}
    space = parse_space(data, "nogrid", "nogrid.yaml")
    resolve(space, FixedTrial({"optim.lr": 1e-3}))
    with pytest.raises(ConfigError, match="optim.lr: no grid values"):
        grid_points(space)


def test_unknown_space_name_lists_builtins() -> None:
    with pytest.raises(UserError, match="no built-in space of that name .*quick"):
        load_space("no-such-space")


def test_python_space_by_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.py"
    path.write_text("SPACE = {'params': {'optim.lr': {'float': [1e-3, 1e-2], 'log': True, 'grid': [1e-3]}}}\n")
    space = load_space(str(path))
    assert [p["optim.lr"] for p in grid_points(space)] == [1e-3]
    (tmp_path / "broken.py").write_text("SPACE = 1/0\n")
    with pytest.raises(ConfigError, match="broken.py: error while running it: ZeroDivisionError"):
        load_space(str(tmp_path / "broken.py"))


def test_data_space_files_are_never_executed(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError):
        load_space(str(path))


# --------------------------------------------------------------------------- issue 23: knobs, stages

RESNET = {
    "name": "res",
    "base": {"image_size": 16, "model": {"family": "resnet", "head": "gap"}, "train": {"epochs": 1}},
    "stages": {"depth": {"int": [1, 3]}, "channels": {"choices": [4, 8]}, "blocks": {"int": [1, 2], "grid": [1]},
               "stride": 2},
    "params": {"model.activation": {"choices": ["relu", "prelu", "tanh"], "grid": ["prelu"]},
               "model.init": {"choices": ["kaiming_uniform", "xavier_normal"]},
               "optim.l1": {"float": [0.0, 1.0e-4], "grid": [0.0]}},
}


def test_resnet_scratch_space_and_its_baseline() -> None:
    space = load_space("resnet-scratch")
    assert space.baseline is not None
    cfg = resolve(space, FixedTrial(space.baseline))
    m = cfg.model
    assert m.family == "resnet" and m.head == "gap" and m.batch_norm and m.activation == "relu"
    assert [(s.channels, s.blocks, s.stride) for s in m.stages] == [(16, 1, 2), (32, 1, 2), (64, 1, 2)]
    assert m.init == "kaiming_normal" and m.dropout == 0.0
    assert (cfg.image_size, cfg.train.epochs, cfg.optim.name, cfg.optim.lr) == (64, 20, "adam", 1e-3)
    from catdog_hpo.engine.models import model_cost

    for point in grid_points(space)[::20]:  # every grid point builds and is priced
        model_cost(resolve(space, FixedTrial(point)).model, 2, 64)


def test_stage_params_exist_only_for_existing_stages() -> None:
    space = parse_space(RESNET, "res", "res.yaml")
    assert space.param_names()[:7] == ["stages", "stage0.channels", "stage0.blocks", "stage1.channels",
                                       "stage1.blocks", "stage2.channels", "stage2.blocks"]
    cfg = resolve(space, FixedTrial({"stages": 2, "stage0.channels": 8, "stage0.blocks": 2, "stage1.channels": 4,
                                     "stage1.blocks": 1, "model.activation": "tanh",
                                     "model.init": "xavier_normal", "optim.l1": 1e-5}))
    assert [(s.channels, s.blocks, s.stride) for s in cfg.model.stages] == [(8, 2, 2), (4, 1, 2)]
    assert (cfg.model.activation, cfg.model.init, cfg.optim.l1) == ("tanh", "xavier_normal", 1e-5)
    points = grid_points(space)
    assert len(points) == (2 + 4 + 8) * 2  # channels per stage x init (activation and l1: one grid value)
    for p in points:
        assert all(f"stage{i}.channels" in p for i in range(p["stages"])) and f"stage{p['stages']}.channels" not in p
        resolve(space, FixedTrial(p))


def test_blocks_and_stages_in_one_space_and_a_condition_on_the_stage_count() -> None:
    data = {**SMALL, "stages": {"depth": {"choices": [1, 2]}, "channels": 4},
            "blocks": {"depth": 1, "channels": 8, "stride": {"choices": [1, 2]}, "padding": {"choices": ["same", "valid"]}},
            "params": {"optim.lr": {"float": [1e-3, 1e-2], "when": {"stages": [2]}, "grid": [1e-3]}}}
    space = parse_space(data, "both", "both.yaml")
    assert space.param_names() == ["block0.stride", "block0.padding", "stages", "optim.lr"]  # depth: fixed
    cfg = resolve(space, FixedTrial({"block0.stride": 2, "block0.padding": "valid", "stages": 2, "optim.lr": 1e-3}))
    assert (cfg.model.blocks[0].stride, cfg.model.blocks[0].padding) == (2, "valid")
    assert [s.channels for s in cfg.model.stages] == [4, 4] and cfg.optim.lr == 1e-3
    assert len(grid_points(space)) == 2 * 2 * 2
    assert all(("optim.lr" in p) == (p["stages"] == 2) for p in grid_points(space))


def test_baseline_needing_a_missing_stage_param_is_refused() -> None:
    data = {**RESNET, "baseline": {"stages": 2, "stage0.channels": 4, "stage0.blocks": 1, "model.activation": "relu",
                                   "model.init": "kaiming_uniform", "optim.l1": 0.0}}
    with pytest.raises(ConfigError, match="res.yaml: baseline: .*stage1.channels"):
        parse_space(data, "res", "res.yaml")


def test_a_point_at_the_deepest_depth_past_the_grid_is_a_point_of_the_space() -> None:
    # seed-cnn searches depth 2..5 and grids 2, 3, 4: a depth-5 config (block4.*) is a point of
    # the space, so --enqueue and --warm-start replay it (its parameter names once stopped at the
    # grid's depth, and a warm start skipped a source's three best, all depth 5)
    from catdog_hpo.search.space_files import check_params

    space = load_space("seed-cnn")
    point = dict(space.baseline or {}, depth=5)
    for i in range(3, 5):
        point.update({f"block{i}.channels": 64, f"block{i}.kernel_size": 3, f"block{i}.convs": 1})
    check_params(space, point, "test")
    assert resolve(space, FixedTrial(point)).model.blocks[4].channels == 64
    with pytest.raises(ConfigError, match="'block5.channels' is not a parameter"):
        check_params(space, {**point, "block5.channels": 64}, "test")
