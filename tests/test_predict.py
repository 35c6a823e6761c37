"""`catdog-hpo predict` and the TorchScript/ONNX files: same decoding as training, the three
model formats agreeing, bad images reported per file, bad model files as one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from catdog_hpo.ship.checkpoint import save_checkpoint
from catdog_hpo.cli import main
from catdog_hpo.config import BlockConfig, ModelConfig, StageConfig, TrialConfig
from catdog_hpo.data import DataSource, load_images
from catdog_hpo.engine.augment import normalize, normalize_batch
from catdog_hpo.ship.formats import check_onnx, export_all, load_torchscript, onnx_session
from catdog_hpo.ship.model_meta import META_KEY, ModelMeta
from catdog_hpo.engine.models import build_model
from catdog_hpo.ship.predict import format_table, load_predictor, predict

SIZE = 16  # px
CLASSES = ("cat", "dog")
CFG = TrialConfig(image_size=SIZE, model=ModelConfig(blocks=(BlockConfig(4), BlockConfig(8)), head="gap",
                                                        dropout=0.0))
CPU = torch.device("cpu")


def rgb(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def write_varied_images(folder: Path, rng: np.random.Generator) -> list[Path]:
    """Images that exercise the decoder: non-square, RGBA, greyscale, palette, EXIF-rotated JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    rgba = Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "RGBA")
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees clockwise to display
    files = {
        "a_wide.png": (rgb(rng, 40, 24), {}),
        "b_alpha.png": (rgba, {}),
        "c_grey.png": (rgb(rng, 18, 30).convert("L"), {}),
        "d_palette.gif": (rgb(rng, 22, 22).convert("P"), {}),
        "e_rotated.jpg": (rgb(rng, 48, 32), {"exif": exif, "quality": 90}),
    }
    paths = []
    for name, (img, kw) in files.items():
        img.save(folder / name, **kw)
        paths.append(folder / name)
    return paths


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A checkpoint of a (randomly initialised) model, and its TorchScript and ONNX exports."""
    tmp = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    model = build_model(CFG.model, len(CLASSES), SIZE).eval()
    ck = tmp / "model.pt"
    save_checkpoint(ck, model.state_dict(), CFG, CLASSES, {"val_acc": 0.5})
    from catdog_hpo.engine.augment import MEAN, STD

    meta = ModelMeta(CLASSES, SIZE, tuple(MEAN), tuple(STD))
    batch = normalize_batch(torch.randint(0, 256, (8, 3, SIZE, SIZE), dtype=torch.uint8))
    results = export_all(model, batch, tmp, meta)
    assert [r.ok for r in results] == [True, True], [r.line() for r in results]
    return {"pt": ck, "ts": tmp / "model.ts", "onnx": tmp / "model.onnx", "model": model, "meta": meta,
            "results": results, "tmp": tmp}


def test_exports_carry_metadata_and_match_pytorch(models: dict) -> None:
    for r in models["results"]:
        assert r.max_abs_diff is not None and r.max_abs_diff < 1e-5, r.line()
    session, meta = onnx_session(models["onnx"])
    assert meta == models["meta"]
    assert json.loads(session.get_modelmeta().custom_metadata_map[META_KEY])["classes"] == list(CLASSES)
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a named, dynamic batch axis
    _module, ts_meta = load_torchscript(models["ts"])
    assert ts_meta == models["meta"]
    # Other batch sizes than the one it was exported with.
    for n in (1, 3):
        batch = normalize_batch(torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8))
        assert check_onnx(models["onnx"], models["model"], batch) < 1e-5


def test_predict_sees_exactly_what_training_saw(models: dict, tmp_path: Path) -> None:
    """The same files through the training loader and through predict give the same logits."""
    rng = np.random.default_rng(3)
    for side in ("train", "val"):
        for name in CLASSES:
            write_varied_images(tmp_path / "data" / side / name, rng)
    data = load_images(DataSource(path=str(tmp_path / "data")), SIZE, tmp_path / "cache")
    with torch.no_grad():
        want = torch.softmax(models["model"](normalize_batch(data.val_x)), dim=1)
    rows = predict(load_predictor(models["pt"], CPU), [tmp_path / "data" / "val"])
    assert [r.error for r in rows] == [None] * 10
    got = torch.tensor([[r.probabilities[c] for c in CLASSES] for r in rows])
    assert torch.equal(got, want)  # bit for bit: same decoder, same normalisation arithmetic
    x = data.val_x[:4]
    assert torch.equal(normalize(x, models["meta"].mean, models["meta"].std), normalize_batch(x))


def test_the_three_formats_agree(models: dict, tmp_path: Path) -> None:
    images = write_varied_images(tmp_path / "imgs", np.random.default_rng(5))
    by_kind = {k: predict(load_predictor(models[k], CPU), images) for k in ("pt", "ts", "onnx")}
    probs = {k: torch.tensor([[r.probabilities[c] for c in CLASSES] for r in rows]) for k, rows in by_kind.items()}
    assert (probs["pt"] - probs["ts"]).abs().max() < 1e-5
    assert (probs["pt"] - probs["onnx"]).abs().max() < 1e-5
    assert [r.label for r in by_kind["pt"]] == [r.label for r in by_kind["onnx"]]


def test_bad_images_are_reported_per_file_and_the_rest_go_on(models: dict, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "mixed"
    good = write_varied_images(folder / "sub", np.random.default_rng(1))[:2]
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image: ignored inside a folder")
    (folder / ".hidden.png").write_bytes(b"ignored")
    for p in good[2:]:
        p.unlink()
    (tmp_path / "nothing").mkdir()
    text_file = tmp_path / "readme.txt"
    text_file.write_text("named explicitly, so it is tried")
    argv = ["predict", "--model", str(models["onnx"]), str(folder), str(tmp_path / "missing.png"),
            str(tmp_path / "nothing"), str(text_file), "--json"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_name = {Path(r["image"]).name: r for r in rows}
    assert sorted(by_name) == sorted(["corrupt.png", "empty.jpg", "a_wide.png", "b_alpha.png", "c_grey.png",
                                      "d_palette.gif", "e_rotated.jpg", "missing.png", "nothing", "readme.txt"])
    for name in ("a_wide.png", "b_alpha.png", "c_grey.png", "d_palette.gif", "e_rotated.jpg"):
        r = by_name[name]
        assert r["class"] in CLASSES and r["probability"] == max(r["probabilities"].values()) >= 0.5
        assert sum(r["probabilities"].values()) == pytest.approx(1.0)
    assert by_name["empty.jpg"]["error"] == "empty file"
    assert by_name["readme.txt"]["error"] == "not an image"
    assert "error" in by_name["corrupt.png"] and "class" not in by_name["corrupt.png"]
    assert by_name["missing.png"]["error"] == "no such file or folder"
    assert by_name["nothing"]["error"].startswith("a folder with no images")


def test_no_image_predicted_is_exit_2_after_the_table(models: dict, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("text")
    assert main(["predict", "--model", str(models["pt"]), str(bad)]) == 2
    captured = capsys.readouterr()
    assert "bad.png" in captured.out and "error: not an image" in captured.out
    assert captured.err == "catdog-hpo predict: error: none of the 1 inputs could be predicted\n"


def test_table(models: dict, tmp_path: Path) -> None:
    images = write_varied_images(tmp_path, np.random.default_rng(2))[:2]
    rows = predict(load_predictor(models["ts"], CPU), images)
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["image", "class", "probability"]
    assert all(line.split()[1] in CLASSES and 0.5 <= float(line.split()[2]) <= 1 for line in lines[1:])


def _onnx_without_metadata(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["logits"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


@pytest.mark.parametrize("case, message", [
    ("missing.pt", "missing.pt: no such file"),
    ("text.pt", "text.pt: not a catdog-hpo checkpoint"),
    ("image.png", "unknown model file type '.png'"),
    ("text.onnx", "text.onnx: not an ONNX model onnxruntime can load"),
    ("plain.onnx", "plain.onnx: an ONNX model without catdog-hpo metadata"),
    ("future.pt", "checkpoint format_version 99; this catdog-hpo reads version 1"),
    ("other.pt", "not a catdog-hpo checkpoint (no 'catdog-hpo-checkpoint' marker)"),
    ("text.ts", "text.ts: not a TorchScript model"),
    ("folder", "is a folder"),
])
def test_bad_model_files_are_one_line_errors(case: str, message: str, models: dict, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / case
    if case.startswith("text."):
        path.write_text("hello, I am text")
    elif case == "image.png":
        rgb(np.random.default_rng(0), 8, 8).save(path)
    elif case == "plain.onnx":
        _onnx_without_metadata(path)
    elif case == "future.pt":
        torch.save({"format": "catdog-hpo-checkpoint", "format_version": 99}, path)
    elif case == "other.pt":
        torch.save({"weights": torch.zeros(2)}, path)
    elif case == "folder":
        path.mkdir()
    image = tmp_path / "x.png"
    rgb(np.random.default_rng(0), 8, 8).save(image)
    assert main(["predict", "--model", str(path), str(image)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("catdog-hpo predict: error: ") and captured.err.count("\n") == 1
    assert message in captured.err
    assert "Traceback" not in captured.err


# The knobs of issue 23 in every format: PReLU and tanh, a strided 'valid' conv in place of a
# pooling, Xavier init, and the small ResNet's residual blocks with their projection shortcuts.
NEW_KNOBS = {
    "cnn-prelu-strided-valid": ModelConfig(
        blocks=(BlockConfig(4, 3, 1, stride=2, padding="valid"), BlockConfig(8, 5, 2)), activation="prelu",
        head="fc", fc_hidden=8, dropout=0.0, init="xavier_uniform"),
    "resnet-tanh": ModelConfig(family="resnet", stages=(StageConfig(4, 2, 1), StageConfig(8, 1, 2)),
                               activation="tanh", head="gap", dropout=0.0),
}


@pytest.mark.parametrize("name", sorted(NEW_KNOBS))
def test_new_knobs_export_in_every_format(name: str, tmp_path: Path) -> None:
    from catdog_hpo.engine.augment import MEAN, STD
    from catdog_hpo.ship.pt2 import check_pt2

    torch.manual_seed(0)
    model = build_model(NEW_KNOBS[name], len(CLASSES), SIZE).eval()
    meta = ModelMeta(CLASSES, SIZE, tuple(MEAN), tuple(STD))
    batch = normalize_batch(torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8))
    results = export_all(model, batch, tmp_path, meta, formats=("torchscript", "onnx", "pt2"))
    assert [r.ok for r in results] == [True, True, True], [r.line() for r in results]
    assert all(r.max_abs_diff is not None and r.max_abs_diff < 1e-5 for r in results), [r.line() for r in results]
    assert results[1].note == "torch.export-based exporter"  # no fallback to the legacy ONNX exporter
    for n in (1, 3):  # the batch axis stays dynamic
        other = normalize_batch(torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8))
        assert check_onnx(tmp_path / "model.onnx", model, other) < 1e-5
        assert check_pt2(tmp_path / "model.pt2", model, other) < 1e-5
