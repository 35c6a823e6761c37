"""The data layer: folders (both layouts), awkward and bad files, the on-disk cache (reuse,
invalidation, several processes at once) and the built-in datasets (synthetic, and CIFAR-10 /
Oxford-IIIT Pet from small files in torchvision's on-disk formats)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import catdog_hpo.data.decode as decode_mod
from catdog_hpo.data import DataSource, ImageSet, load_images
from catdog_hpo.data.builtin import DATASETS, SYNTHETIC_TRAIN, SYNTHETIC_VAL
from catdog_hpo.data.folder import Entry, stratified_split
from catdog_hpo.errors import UserError

from helpers import (
    kaggle_path,
    write_16bit_png,
    write_bomb_png,
    write_broken_symlink,
    write_class_dir,
    write_cmyk_jpeg,
    write_corrupt_jpeg,
    write_empty_file,
    write_exif_rotated_jpeg,
    write_fake_cifar,
    write_fake_pets,
    write_gray,
    write_huge_png,
    write_image_folder,
    write_not_an_image,
    write_palette_png,
    write_rgba_png,
    write_truncated_jpeg,
)

REPO = Path(__file__).resolve().parents[1]


def load(path: Path, cache: Path, size: int = 16, **kw: object) -> ImageSet:
    return load_images(DataSource(path=str(path), **kw), size, cache)


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the decoder (one per cache miss of a folder): the list grows per call."""
    calls: list[int] = []
    real = decode_mod.decode_files

    def counting(paths, size, workers=None, channels_first=False):  # type: ignore[no-untyped-def]
        calls.append(len(paths))
        return real(paths, size, workers, channels_first)

    monkeypatch.setattr(decode_mod, "decode_files", counting)
    return calls


# ----------------------------------------------------------------------------- layouts


def test_split_layout_gives_exact_pixels_labels_and_sorted_classes(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "d", classes=("dog", "cat"), n_per_class=4, size=16, n_val_per_class=2)
    data = load(root, tmp_path / "cache", size=16)
    assert data.classes == ("cat", "dog")  # sorted folder names
    assert data.train_x.shape == (8, 3, 16, 16) and data.train_x.dtype == torch.uint8
    assert data.val_x.shape == (4, 3, 16, 16) and data.val_y.dtype == torch.int64
    assert data.train_y.tolist() == [0] * 4 + [1] * 4 and data.val_y.tolist() == [0, 0, 1, 1]
    assert data.image_size == 16 and data.skipped == () and len(data.fingerprint) == 64
    first = np.array(Image.open(root / "train/cat/000.png").convert("RGB"))  # same size: pixels unchanged
    assert torch.equal(data.train_x[0], torch.from_numpy(first).permute(2, 0, 1))


def test_resize_keeps_the_centre_square(tmp_path: Path) -> None:
    img = np.zeros((10, 30, 3), dtype=np.uint8)  # 30 wide: left third red, middle green, right blue
    img[:, :10, 0] = img[:, 10:20, 1] = img[:, 20:, 2] = 255
    for cls in ("a", "b"):
        (tmp_path / "d" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(img).save(tmp_path / "d" / cls / f"{i}.png")
    data = load(tmp_path / "d", tmp_path / "cache", size=10)
    assert torch.equal(data.train_x[0, :, 5, 5], torch.tensor([0, 255, 0], dtype=torch.uint8))
    assert (data.train_x[:, 1] == 255).all()  # only the green centre survives the crop


def test_flat_layout_split_is_stratified_deterministic_and_seeded(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "d", classes=("ant", "bee", "cow"), n_per_class=10, split=False)
    a = load(root, tmp_path / "c1", val_fraction=0.2, split_seed=0)
    b = load(root, tmp_path / "c2", val_fraction=0.2, split_seed=0)  # fresh cache: decoded again
    c = load(root, tmp_path / "c3", val_fraction=0.2, split_seed=1)
    assert a.classes == ("ant", "bee", "cow")
    assert torch.bincount(a.val_y).tolist() == [2, 2, 2] and torch.bincount(a.train_y).tolist() == [8, 8, 8]
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_x, b.train_x)
    assert not torch.equal(a.val_x, c.val_x)
    assert torch.bincount(c.val_y).tolist() == [2, 2, 2]
    assert a.fingerprint != c.fingerprint


def test_split_keeps_each_files_side_when_files_are_added() -> None:
    entries = [Entry(f"cat/{i:03d}.jpg", 0, None) for i in range(50)]
    before = dict(zip((e.rel for e in entries), stratified_split(entries, ("cat",), 0.2, 7, "x")))
    more = entries + [Entry(f"cat/new{i}.jpg", 0, None) for i in range(5)]
    after = dict(zip((e.rel for e in more), stratified_split(more, ("cat",), 0.2, 7, "x")))
    assert sum(before.values()) == 10 and sum(after.values()) == 11
    moved = [rel for rel in before if before[rel] != after[rel]]
    assert len(moved) <= 1  # at most the one file pushed across the new cut


def test_extensions_any_case_and_hidden_files_ignored(tmp_path: Path) -> None:
    root = tmp_path / "d"
    rng = np.random.default_rng(0)
    exts = ["JPG", "jpeg", "Png", "bmp", "gif", "webp", "tif", "TIFF"]
    for cls in ("cat", "dog"):
        for i, ext in enumerate(exts):
            write_class_dir(root / cls / f"sub{i}", 0, 2, 1, 8, rng, ext)  # nested folders count too
        (root / cls / "notes.txt").write_text("not an image")
        write_class_dir(root / cls / ".hidden", 0, 2, 2, 8, rng)  # hidden folder: ignored
        Image.new("RGB", (8, 8)).save(root / cls / ".dotfile.png")  # hidden file: ignored
    data = load(root, tmp_path / "cache", size=8, val_fraction=0.25)
    assert len(data.train_y) + len(data.val_y) == 2 * len(exts)
    assert data.skipped == ()


# ----------------------------------------------------------------------------- awkward files


def test_awkward_modes_decode_to_rgb(tmp_path: Path) -> None:
    d = tmp_path
    files = [
        write_rgba_png(d / "rgba.png", alpha=0),  # transparent -> white
        write_rgba_png(d / "rgba_opaque.png", alpha=255, rgb=(255, 0, 0)),
        write_gray(d / "gray.png", value=77),
        write_gray(d / "gray.jpg", value=77),
        write_cmyk_jpeg(d / "cmyk.jpg"),  # red ink
        write_16bit_png(d / "sixteen.png", value=65535),
        write_palette_png(d / "palette.png"),
        write_exif_rotated_jpeg(d / "exif.jpg", 32, 16, orientation=6),
    ]
    px, reasons = decode_mod.decode_files(files, 16)
    assert reasons == [None] * len(files)
    rgb = {f.name: px[i] for i, f in enumerate(files)}
    assert (rgb["rgba.png"] == 255).all()
    assert (rgb["rgba_opaque.png"] == [255, 0, 0]).all()
    assert (rgb["gray.png"] == 77).all() and (np.abs(rgb["gray.jpg"].astype(int) - 77) <= 2).all()
    assert (np.abs(rgb["cmyk.jpg"].astype(int) - [255, 0, 0]) <= 3).all()
    assert (rgb["sixteen.png"] == 255).all()
    assert (rgb["palette.png"][:, :8] == 255).all() and (rgb["palette.png"][:, 8:] == [0, 0, 255]).all()
    # EXIF orientation 6: stored red-left/blue-right, shown rotated: red on top, blue below
    top, bottom = rgb["exif.jpg"][1, 8].astype(int), rgb["exif.jpg"][14, 8].astype(int)
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50


def test_huge_valid_image_loads_downscaled(tmp_path: Path) -> None:
    huge = write_huge_png(tmp_path / "huge.png", 10_000, 10_000, value=200)  # 100 M pixels, ~0.5 MB
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's decompression-bomb warning must not escape
        px, reasons = decode_mod.decode_files([huge], 8)
    assert reasons == [None]
    assert (px[0] == 200).all()


def _folder_with_bad_files(root: Path) -> list[str]:
    write_image_folder(root, n_per_class=3, split=True, n_val_per_class=2)
    bad = root / "train" / "cat"
    write_corrupt_jpeg(bad / "corrupt.jpg")
    write_truncated_jpeg(bad / "truncated.jpg")
    write_empty_file(bad / "empty.jpg")
    write_not_an_image(bad / "text.jpg")
    write_bomb_png(bad / "bomb.png")
    write_broken_symlink(root / "val" / "dog" / "link.jpg")
    return ["corrupt.jpg", "truncated.jpg", "empty.jpg", "text.jpg", "bomb.png", "link.jpg"]


def test_bad_files_are_skipped_named_in_one_warning_and_recorded(tmp_path: Path) -> None:
    names = _folder_with_bad_files(tmp_path / "d")
    with pytest.warns(UserWarning) as record:
        data = load(tmp_path / "d", tmp_path / "cache")
    ours = [w for w in record if "could not be decoded" in str(w.message)]
    assert len(ours) == 1
    msg = str(ours[0].message)
    assert msg.startswith(f"{tmp_path / 'd'}: skipped 6 of 16 files that could not be decoded: ")
    assert msg.endswith(", and 1 more") and "\n" not in msg
    assert len(data.train_y) == 6 and len(data.val_y) == 4
    reasons = {s.split(" (")[0].rsplit("/", 1)[-1]: s.split(" (", 1)[1].rstrip(")") for s in data.skipped}
    assert sorted(reasons) == sorted(names)
    assert reasons["truncated.jpg"] == "truncated"
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["text.jpg"] == "not an image"
    assert reasons["bomb.png"].startswith("too large")
    assert reasons["link.jpg"].startswith("missing file")
    assert reasons["corrupt.jpg"].startswith("cannot decode")
    # a cache hit reports the same skips again
    with pytest.warns(UserWarning, match="skipped 6 of 16"):
        again = load(tmp_path / "d", tmp_path / "cache")
    assert again.skipped == data.skipped


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode (see the monkeypatched test)")
def test_unreadable_file_is_skipped(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "d", n_per_class=3)
    locked = root / "train" / "cat" / "000.png"
    locked.chmod(0)
    try:
        with pytest.warns(UserWarning, match="permission denied"):
            data = load(root, tmp_path / "cache")
    finally:
        locked.chmod(0o644)
    assert data.skipped == ("train/cat/000.png (unreadable: permission denied)",)


def test_permission_error_is_reported_as_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_image_folder(tmp_path / "d", n_per_class=3)
    real_open = Image.open

    def guarded(fp, *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(fp).name == "001.png" and "train/dog" in Path(fp).as_posix():
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(decode_mod.Image, "open", guarded)
    with pytest.warns(UserWarning, match="skipped 1 of 10"):
        data = load(root, tmp_path / "cache")
    assert data.skipped == ("train/dog/001.png (unreadable: permission denied)",)


# ----------------------------------------------------------------------------- user errors


def _write_some(folder: Path, n: int = 2) -> None:
    write_class_dir(folder, 0, 2, n, 8, np.random.default_rng(0))


def _missing(tmp: Path) -> Path:
    return tmp / "nope"


def _a_file(tmp: Path) -> Path:
    (tmp / "f.jpg").write_bytes(b"x")
    return tmp / "f.jpg"


def _empty(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _one_class(tmp: Path) -> Path:
    _write_some(tmp / "d" / "cat")
    return tmp / "d"


def _empty_class(tmp: Path) -> Path:
    _write_some(tmp / "d" / "cat")
    (tmp / "d" / "dog").mkdir()
    (tmp / "d" / "dog" / "readme.txt").write_text("no images here")
    return tmp / "d"


def _no_val(tmp: Path) -> Path:
    write_image_folder(tmp / "d", n_per_class=2)
    for f in (tmp / "d" / "val").rglob("*.png"):
        f.unlink()
    for sub in sorted((tmp / "d" / "val").iterdir()):
        sub.rmdir()
    (tmp / "d" / "val").rmdir()
    return tmp / "d"


def _no_train(tmp: Path) -> Path:
    _write_some(tmp / "d" / "val" / "cat")
    _write_some(tmp / "d" / "val" / "dog")
    return tmp / "d"


def _different_classes(tmp: Path) -> Path:
    write_image_folder(tmp / "d", n_per_class=2)
    (tmp / "d" / "val" / "dog").rename(tmp / "d" / "val" / "fox")
    return tmp / "d"


def _all_corrupt_class(tmp: Path) -> Path:
    write_image_folder(tmp / "d", n_per_class=2)
    for f in (tmp / "d" / "train" / "dog").iterdir():
        write_not_an_image(f)
    return tmp / "d"


def _single_usable_image(tmp: Path) -> Path:
    _write_some(tmp / "d" / "cat", 4)
    _write_some(tmp / "d" / "dog", 1)
    return tmp / "d"


@pytest.mark.parametrize(
    "make,expect",
    [
        (_missing, "nope: no such folder"),
        (_a_file, "f.jpg: is a file"),
        (_empty, "empty: no class folders"),
        (_one_class, "d: only one class folder (cat)"),
        (_empty_class, "dog: no images"),
        (_no_val, "d: has train/ but no val/ folder"),
        (_no_train, "d: has val/ but no train/ folder"),
        (_different_classes, "only in train: dog; only in val: fox"),
        (_all_corrupt_class, "train/dog: no usable images"),
        (_single_usable_image, "dog: 1 usable image(s)"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else "",
)
def test_bad_layouts_raise_one_line_user_errors(tmp_path: Path, make, expect: str) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the all-corrupt case also warns about its skips
        with pytest.raises(UserError) as info:
            load(path, tmp_path / "cache")
    msg = str(info.value)
    assert expect in msg and "\n" not in msg
    assert str(tmp_path) in msg  # names the path


def test_unknown_dataset_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown dataset 'mnist' .choices: synthetic, cifar10-catdog, oxford-pets"):
        load_images(DataSource(name="mnist"), 16, tmp_path)


# ----------------------------------------------------------------------------- cache


def test_second_load_reads_the_cache_without_decoding(tmp_path: Path, decode_calls: list[int]) -> None:
    root = write_image_folder(tmp_path / "d", n_per_class=4)
    a = load(root, tmp_path / "cache")
    b = load(root, tmp_path / "cache")
    assert decode_calls == [12]  # decoded once
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y)
    assert a.fingerprint == b.fingerprint and b.classes == a.classes
    cached = list((tmp_path / "cache").glob("*.pt"))
    assert len(cached) == 1 and cached[0].name.startswith("d-16px-")


def test_cache_is_rebuilt_when_inputs_change(tmp_path: Path, decode_calls: list[int]) -> None:
    root = write_image_folder(tmp_path / "d", n_per_class=4)
    cache = tmp_path / "cache"
    fps = [load(root, cache).fingerprint]
    f = root / "train" / "cat" / "000.png"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched
    fps.append(load(root, cache).fingerprint)
    write_class_dir(root / "train" / "dog" / "more", 1, 2, 1, 16, np.random.default_rng(9))  # added
    fps.append(load(root, cache).fingerprint)
    (root / "val" / "cat" / "000.png").unlink()  # removed
    fps.append(load(root, cache).fingerprint)
    fps.append(load(root, cache, size=8).fingerprint)  # another size
    fps.append(load(root, cache, size=8).fingerprint)  # same again: a hit
    assert len(set(fps)) == 5 and fps[-1] == fps[-2]
    assert len(decode_calls) == 5
    assert len(list(cache.glob("*.pt"))) == 5


def test_corrupt_cache_file_is_rebuilt(tmp_path: Path, decode_calls: list[int]) -> None:
    root = write_image_folder(tmp_path / "d", n_per_class=2)
    first = load(root, tmp_path / "cache")
    (cached,) = (tmp_path / "cache").glob("*.pt")
    cached.write_bytes(b"garbage")
    second = load(root, tmp_path / "cache")
    assert len(decode_calls) == 2 and torch.equal(first.train_x, second.train_x)


_CHILD = textwrap.dedent(
    """
    import hashlib, sys
    from pathlib import Path
    import catdog_hpo.data.decode as d
    from catdog_hpo.data import DataSource, load_images
    calls = []
    real = d.decode_files
    d.decode_files = lambda *a, **k: calls.append(1) or real(*a, **k)
    data = load_images(DataSource(path=sys.argv[1]), 16, Path(sys.argv[2]))
    h = hashlib.sha256()
    for t in (data.train_x, data.train_y, data.val_x, data.val_y):
        h.update(t.numpy().tobytes())
    print(len(calls), h.hexdigest(), data.fingerprint)
    """
)


def test_processes_loading_at_once_share_one_cache(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "d", n_per_class=30, size=32)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(root), str(cache)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    lines = [out.split() for out, _ in outs]
    assert len({(h, fp) for _, h, fp in lines}) == 1  # identical tensors everywhere
    assert sum(int(n) for n, _, _ in lines) == 1  # decoded by exactly one of them (the lock)
    assert len(list(cache.glob("*.pt"))) == 1 and not list(cache.glob("*.tmp"))


# ----------------------------------------------------------------------------- built-ins


def test_registry_keys_are_the_cli_choices() -> None:
    assert list(DATASETS) == ["synthetic", "cifar10-catdog", "oxford-pets"]


def test_synthetic_is_seeded_balanced_and_made_at_the_size(tmp_path: Path) -> None:
    a = load_images(DataSource(name="synthetic"), 24, tmp_path / "c1")
    b = load_images(DataSource(name="synthetic"), 24, tmp_path / "c2")
    c = load_images(DataSource(name="synthetic", split_seed=1), 24, tmp_path / "c1")
    assert a.train_x.shape == (SYNTHETIC_TRAIN, 3, 24, 24) and a.val_x.shape == (SYNTHETIC_VAL, 3, 24, 24)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y) and a.fingerprint == b.fingerprint
    assert not torch.equal(a.train_x, c.train_x) and a.fingerprint != c.fingerprint
    assert torch.bincount(a.train_y).tolist() == [SYNTHETIC_TRAIN // 2] * 2
    assert a.classes == ("stripes", "checks")
    assert not torch.equal(a.train_x[:SYNTHETIC_VAL], a.val_x)  # val is not a copy of train
    # colour carries no class signal: per-class mean colours agree to within a few levels
    means = [a.train_x[a.train_y == k].float().mean((0, 2, 3)) for k in (0, 1)]
    assert (means[0] - means[1]).abs().max() < 6


def test_fake_cifar_loads_cats_and_dogs_like_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_cifar(tmp_path / "datasets", per_batch=10)
    source = DataSource(name="cifar10-catdog", root=str(tmp_path / "datasets"))
    data = load_images(source, 32, tmp_path / "cache")
    assert data.classes == ("cat", "dog")
    # Validation is carved from the 10 training images (20% of each class, seeded); the test
    # batch's 2 images are never searched on.
    assert data.train_x.shape == (8, 3, 32, 32) and data.val_x.shape == (2, 3, 32, 32)
    assert torch.bincount(data.train_y).tolist() == [4, 4] and torch.bincount(data.val_y).tolist() == [1, 1]
    assert (data.train_x[data.train_y == 0][:, :, 1:, :] == 60).all()  # cat pixels = 3 * 20
    assert (data.train_x[data.train_y == 1][:, :, 1:, :] == 100).all()  # dog pixels = 5 * 20
    again = load_images(DataSource(name="cifar10-catdog", root=str(tmp_path / "datasets"), split_seed=0),
                        32, tmp_path / "cache2")
    assert torch.equal(again.val_x, data.val_x)  # seeded: the same split every time

    # torchvision reads the same files the same way (its md5 check cannot pass on fake files)
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    tv = tv_cifar.CIFAR10(str(tmp_path / "datasets"), train=True, download=False)
    keep = [i for i, t in enumerate(tv.targets) if t in (3, 5)]
    ours = torch.cat([data.train_x, data.val_x])
    theirs = torch.from_numpy(tv.data[keep]).permute(0, 3, 1, 2)
    assert sorted(map(bytes, ours.flatten(1).numpy())) == sorted(map(bytes, theirs.flatten(1).numpy()))
    test = tv_cifar.CIFAR10(str(tmp_path / "datasets"), train=False, download=False)
    test_rows = {bytes(r) for r in torch.from_numpy(test.data).permute(0, 3, 1, 2).flatten(1).numpy()}
    assert not test_rows & {bytes(r) for r in ours.flatten(1).numpy()}  # nothing of the test split

    small = load_images(source, 16, tmp_path / "cache")  # resized from 32 px
    assert small.train_x.shape == (8, 3, 16, 16) and (small.train_x[small.train_y == 0][:, :, 2:, :] == 60).all()


def test_cifar_download_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    root = tmp_path / "datasets"
    with pytest.raises(UserError) as info:
        load_images(DataSource(name="cifar10-catdog", root=str(root)), 32, tmp_path / "cache")
    msg = str(info.value)
    assert msg.startswith(f"could not download CIFAR-10 to {root}: ")
    assert "put cifar-10-batches-py there" in msg and "--data DIR" in msg and "\n" not in msg


def test_fake_pets_load_like_torchvision(tmp_path: Path) -> None:
    write_fake_pets(tmp_path / "datasets", n_trainval=8, n_test=4, size=24)
    data = load_images(DataSource(name="oxford-pets", root=str(tmp_path / "datasets")), 16, tmp_path / "cache")
    assert data.classes == ("cat", "dog")
    # train and val both come from trainval.txt (8 images: 20% of each class to val); test.txt stays out
    assert data.train_x.shape == (6, 3, 16, 16) and data.val_x.shape == (2, 3, 16, 16)
    assert torch.bincount(data.val_y).tolist() == [1, 1]

    from torchvision.datasets import OxfordIIITPet

    tv = OxfordIIITPet(str(tmp_path / "datasets"), split="trainval", target_types="binary-category", download=False)
    assert sorted(tv[i][1] for i in range(len(tv))) == sorted(data.train_y.tolist() + data.val_y.tolist())


def test_pets_download_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.oxford_iiit_pet as tv_pets

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_pets, "download_and_extract_archive", offline)
    with pytest.raises(UserError, match=r"could not download Oxford-IIIT Pet to .*: <urlopen error no network>; put oxford-iiit-pet there"):
        load_images(DataSource(name="oxford-pets", root=str(tmp_path / "ds")), 16, tmp_path / "cache")


def test_bad_pets_annotation_line_names_file_and_line(tmp_path: Path) -> None:
    base = write_fake_pets(tmp_path / "datasets", n_trainval=4, n_test=2)
    with open(base / "annotations" / "trainval.txt", "a") as f:  # test.txt is not read: never searched on
        f.write("broken line\n")
    with pytest.raises(UserError, match=r"trainval.txt:5: expected"):
        load_images(DataSource(name="oxford-pets", root=str(tmp_path / "datasets")), 16, tmp_path / "cache")


@pytest.mark.skipif(kaggle_path() is None, reason="the shared catdog-kaggle-3k photos are not here")
def test_real_photos_first_files_decode(tmp_path: Path) -> None:
    root = kaggle_path()
    assert root is not None
    files = sorted((root / "train" / "cat").iterdir())[:8]
    px, reasons = decode_mod.decode_files(files, 32)
    assert reasons == [None] * 8 and px.shape == (8, 32, 32, 3) and px.std() > 10


def test_fingerprint_digest_is_sha256_hex(tmp_path: Path) -> None:
    data = load_images(DataSource(name="synthetic"), 8, tmp_path)
    int(data.fingerprint, 16)
    assert len(data.fingerprint) == len(hashlib.sha256().hexdigest())


def test_cifar_batch_with_foreign_pickle_globals_is_refused(tmp_path: Path) -> None:
    import pickle

    base = write_fake_cifar(tmp_path / "datasets", per_batch=4)

    class Sneaky:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("echo should-not-run",))

    with open(base / "data_batch_2", "wb") as f:
        pickle.dump({"data": Sneaky(), "labels": [3]}, f, protocol=2)
    with pytest.raises(UserError, match=r"data_batch_2: not a CIFAR-10 python batch \(refusing to load (posix|nt).system\)"):
        load_images(DataSource(name="cifar10-catdog", root=str(tmp_path / "datasets")), 32, tmp_path / "cache")
