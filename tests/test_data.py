from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mextract.data import (
    DATASETS,
    IMAGE_RANGE,
    UNBOUNDED,
    ValueRange,
    dataset_info,
    files,
    load_file,
    load_splits,
)
from mextract.data.augment import flip_crop, trivial_augment_wide
from mextract.data.files import CIFAR10_CLASSES, cache_dir
from mextract.errors import DataError, InputError, UnknownNameError


def test_mnist_split_is_the_documented_problem_domain_split() -> None:
    s = load_splits("mnist", seed=0)
    assert (len(s.victim_train), len(s.pool), len(s.test)) == (2000, 2000, 1000)
    assert s.test.input_shape == (1, 28, 28) and s.test.num_classes == 10
    assert float(s.victim_train.x.min()) >= 0.0 and float(s.victim_train.x.max()) <= 1.0
    # disjoint: no image of the pool or the test set is in the victim's training data
    v = {r.numpy().tobytes() for r in s.victim_train.x.flatten(1)}
    assert sum(r.numpy().tobytes() in v for r in s.pool.x.flatten(1)) == 0
    assert sum(r.numpy().tobytes() in v for r in s.test.x.flatten(1)) == 0
    # seeded: same seed, same split; another seed, another split
    assert torch.equal(load_splits("mnist", seed=0).pool.x, s.pool.x)
    assert not torch.equal(load_splits("mnist", seed=1).pool.x, s.pool.x)


@pytest.mark.parametrize("name", ["digits", "breast_cancer", "wine", "iris"])
def test_bundled_sets_split_and_standardise(name: str) -> None:
    s = load_splits(name, seed=0)
    total = len(s.victim_train) + len(s.pool) + len(s.test)
    assert abs(len(s.test) / total - 0.2) < 0.01
    assert abs(len(s.victim_train) - len(s.pool)) <= 1
    if not s.test.is_image:  # standardised with the victim-train statistics
        assert s.victim_train.x.mean(0).abs().max() < 1e-4
        assert (s.victim_train.x.std(0, unbiased=False) - 1).abs().max() < 1e-3


def test_unknown_dataset_and_bad_fraction() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown dataset 'mnsit'; did you mean 'mnist'\? expected"):
        load_splits("mnsit")
    with pytest.raises(UnknownNameError, match="unknown dataset 'xyz'; expected one of"):  # no close match
        load_splits("xyz")
    with pytest.raises(InputError, match="victim_fraction"):
        load_splits("iris", victim_fraction=1.5)
    assert "cifar10" in DATASETS


def _fake_cifar_batches(root: Path, n: int = 6) -> None:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, size=n)),
        }
        with (root / name).open("wb") as fh:
            pickle.dump(batch, fh)


def test_cifar10_from_batches_folder_is_decoded_once_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "cifar-10-batches-py"
    _fake_cifar_batches(root)
    s = load_splits("cifar10", root=root, seed=0)
    assert s.test.input_shape == (3, 32, 32) and len(s.test) == 6
    assert len(s.victim_train) + len(s.pool) == 30 and s.test.classes == CIFAR10_CLASSES
    with (root / "test_batch").open("rb") as fh:
        first = np.frombuffer(pickle.load(fh)[b"data"][0].tobytes(), dtype=np.uint8)
    torch.testing.assert_close(s.test.x[0].flatten(), torch.from_numpy(first / 255.0).float())
    assert len(list(cache_dir().glob("cifar10-*.npz"))) == 1

    def no_decoding(root: Path) -> None:
        raise AssertionError("decoded twice")

    monkeypatch.setattr(files, "_cifar_batches", no_decoding)
    assert torch.equal(load_splits("cifar10", root=root, seed=0).test.x, s.test.x)


def _fake_image_folder(root: Path, classes: list[str], per_class: int, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i:04d}.png")


def test_cifar10_from_image_folder_and_tar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cifar-jpeg"
    _fake_image_folder(root, ["cat", "ship"], per_class=3)
    s = load_splits("cifar10", root=root)
    assert len(s.test) == 6 and set(s.test.y.tolist()) == {3, 8}  # cat, ship in CIFAR order
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="cifar10")
    monkeypatch.setenv("MEXTRACT_CIFAR10", str(archive))
    t = load_splits("cifar10")
    assert torch.equal(t.test.x, s.test.x)


def test_cifar10_without_a_path_says_how_to_give_one() -> None:
    with pytest.raises(DataError, match="MEXTRACT_CIFAR10"):
        load_splits("cifar10")


def test_missing_and_malformed_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such path"):
        load_splits("cifar10", root=tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_1"):
        load_splits("cifar10", root=tmp_path / "half")
    with pytest.raises(DataError, match="does not exist"):
        load_splits("mnist", pool_data=tmp_path / "pool.npz")
    np.savez(tmp_path / "noy.npz", x=np.zeros((3, 1, 28, 28)))
    with pytest.raises(DataError, match="label array 'y'"):
        load_splits("mnist", test_data=tmp_path / "noy.npz")
    np.savez(tmp_path / "badshape.npz", x=np.zeros((3, 5, 5)))
    with pytest.raises(DataError, match=r"expected 'x' of shape \(N, 1, 28, 28\)"):
        load_splits("mnist", pool_data=tmp_path / "badshape.npz")
    np.savez(tmp_path / "nan.npz", x=np.full((2, 1, 28, 28), np.nan))
    with pytest.raises(DataError, match="NaN"):
        load_splits("mnist", pool_data=tmp_path / "nan.npz")


def test_user_npz_replaces_a_split_and_is_conformed(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28, 1), dtype=np.uint8)  # HWC uint8
    np.savez(tmp_path / "pool.npz", x=x)
    s = load_splits("mnist", pool_data=tmp_path / "pool.npz")
    assert s.pool.x.shape == (5, 1, 28, 28) and s.pool.y is None
    torch.testing.assert_close(s.pool.x[0, 0], torch.from_numpy(x[0, :, :, 0] / 255.0).float())
    assert "pool_data" in s.meta["files"]


def test_user_tabular_npz_gets_the_owner_standardisation(tmp_path: Path) -> None:
    base = load_splits("iris")
    mean = np.asarray(base.meta["standardise"]["mean"])
    np.savez(tmp_path / "test.npz", x=np.tile(mean, (4, 1)), y=np.zeros(4, dtype=np.int64))
    s = load_splits("iris", test_data=tmp_path / "test.npz")
    assert s.test.x.abs().max() < 1e-5


def test_user_image_folder_with_and_without_classes(tmp_path: Path) -> None:
    _fake_image_folder(tmp_path / "imgs", ["3", "7"], per_class=2, size=40)
    s = load_splits("mnist", test_data=tmp_path / "imgs" / "test")
    assert s.test.x.shape == (4, 1, 28, 28)  # resized and converted to grey
    assert sorted(s.test.y.tolist()) == [3, 3, 7, 7]  # folder names mapped to mnist's classes
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in (tmp_path / "imgs" / "train" / "3").iterdir():
        (flat / p.name).write_bytes(p.read_bytes())
    pool = load_splits("mnist", pool_data=flat).pool
    assert len(pool) == 2 and pool.y is None
    with pytest.raises(DataError, match="needs labels"):
        load_splits("mnist", test_data=flat)
    _fake_image_folder(tmp_path / "other", ["dog"], per_class=1)
    with pytest.raises(DataError, match="not among the classes"):
        load_splits("mnist", test_data=tmp_path / "other" / "test")


def test_all_splits_from_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name, n in (("v", 20), ("p", 10), ("t", 8)):
        np.savez(tmp_path / f"{name}.npz", x=rng.normal(size=(n, 6)), y=rng.integers(0, 3, n))
    s = load_splits(None, victim_data=tmp_path / "v.npz", pool_data=tmp_path / "p.npz",
                    test_data=tmp_path / "t.npz")  # fmt: skip
    assert (len(s.victim_train), len(s.pool), len(s.test)) == (20, 10, 8) and s.pool.y is None
    with pytest.raises(InputError, match="give all of"):
        load_splits(None, victim_data=tmp_path / "v.npz")
    assert load_file(tmp_path / "t.npz", require_labels=True).num_classes == 3


def test_augmentations_keep_shape_range_and_are_seeded() -> None:
    x = torch.rand(64, 3, 16, 16)
    a = trivial_augment_wide(x, torch.Generator().manual_seed(0))
    b = trivial_augment_wide(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert (a - x).flatten(1).abs().amax(1).gt(1e-6).float().mean() > 0.5  # most images changed
    c = flip_crop(x, torch.Generator().manual_seed(0))
    assert c.shape == x.shape
    same = flip_crop(x, torch.Generator().manual_seed(0), pad=0, flip=False)
    assert torch.equal(same, x)


# --------------------------------------------------------------------------- declared value ranges


@pytest.mark.parametrize("name", ["mnist", "digits", "breast_cancer", "wine", "iris"])
def test_dataset_info_matches_the_loaded_data_and_its_declared_range(name: str) -> None:
    info = dataset_info(name)
    s = load_splits(name, seed=0)
    assert info.input_shape == s.test.input_shape and info.num_classes == s.test.num_classes
    for part in (s.victim_train, s.pool, s.test):
        assert part.declared_range == info.value_range
        part.declared_range.check(part.x, name)  # the bundled data lies in its own range
    assert info.value_range == (IMAGE_RANGE if len(info.input_shape) == 3 else UNBOUNDED)


def test_dataset_info_checks_without_loading(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="MEXTRACT_CIFAR10"):
        dataset_info("cifar10")
    with pytest.raises(DataError, match="nowhere: no such path"):
        dataset_info("cifar10", tmp_path / "nowhere")
    assert dataset_info("cifar10", tmp_path).input_shape == (3, 32, 32)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.full((4, 1, 28, 28), 200.0, np.float32), r"lie in \[200, 200\], expected \[0, 1\].*--scale 255"),
        (np.full((4, 1, 28, 28), -0.5, np.float32), r"values lie in \[-0.5, -0.5\], expected \[0, 1\]$"),
        (np.full((4, 1, 28, 28), np.nan, dtype=np.float32), "NaN"),
        (np.zeros((4, 3, 5), dtype=np.float32), "expected 'x' of shape"),
        (np.zeros((4, 1, 28, 28), dtype=np.complex64), "real numeric"),
    ],
)
def test_user_files_out_of_range_are_named_errors(tmp_path: Path, x: np.ndarray, message: str) -> None:
    np.savez(tmp_path / "pool.npz", x=x)
    with pytest.raises(DataError, match=message) as err:
        load_splits("mnist", pool_data=tmp_path / "pool.npz")
    assert "pool.npz" in str(err.value)


def test_scale_converts_float_pixels_when_asked(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, size=(5, 1, 28, 28)).astype(np.float32)
    np.savez(tmp_path / "pool.npz", x=x)
    pool = load_splits("mnist", pool_data=tmp_path / "pool.npz", scale=255).pool
    torch.testing.assert_close(pool.x, torch.from_numpy(x / 255.0))
    with pytest.raises(InputError, match="scale"):
        load_splits("mnist", pool_data=tmp_path / "pool.npz", scale=0)


def test_value_range_round_trips_and_checkpoints_declare_it(tmp_path: Path) -> None:
    from mextract.models import create_model, load_checkpoint, save_checkpoint

    r = ValueRange(0.0, 1.0)
    assert ValueRange.from_json(r.to_json(), (1, 8, 8)) == r and str(UNBOUNDED) == "[-inf, inf]"
    with pytest.raises(InputError, match="low < high"):
        ValueRange(1.0, 0.0)
    # a checkpoint written before the field existed: the convention for its shape
    save_checkpoint(tmp_path / "c", create_model("mlp", (4,), 3), {"architecture": "mlp", "input_shape": [4],
                                                                   "num_classes": 3})  # fmt: skip
    assert load_checkpoint(tmp_path / "c")[1]["value_range"] == {"low": None, "high": None}
