"""Image data loaders and the classification models (one process, no training)."""

from __future__ import annotations

import functools
import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recipes.classification.data import (
    ClassificationDataModule,
    IDXFormatError,
    load_digits,
    load_idx_images,
    read_idx,
    resize,
    stratified_folds,
    stratified_split,
)
from recipes.classification.models import CNNClassifier, MLPClassifier, mlp, study_cnn
from tests.shared_data import shared_data


def _idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(">u1").tobytes()


def _write_pair(root: Path, images: np.ndarray, labels: np.ndarray, gz: bool = True, split: str = "t10k") -> None:
    root.mkdir(parents=True, exist_ok=True)
    for kind, array, n in (("images", images, 3), ("labels", labels, 1)):
        name = root / f"{split}-{kind}-idx{n}-ubyte"
        if gz:
            with gzip.open(f"{name}.gz", "wb") as f:
                f.write(_idx_bytes(array))
        else:
            name.write_bytes(_idx_bytes(array))


@pytest.fixture
def tiny() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8), np.array([7, 2, 1, 0, 4], dtype=np.uint8)


# -- models ------------------------------------------------------------------------------------------------------


def test_study_cnn_has_the_study_parameter_count_and_shape() -> None:
    model = CNNClassifier()
    assert sum(p.numel() for p in model.parameters()) == 93_322
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert study_cnn(3, 5)(torch.zeros(1, 3, 28, 28)).shape == (1, 5)


def test_mlp_is_configurable() -> None:
    model = MLPClassifier(in_features=64, hidden_sizes=[32, 16], activation="sigmoid", num_classes=3)
    assert model(torch.zeros(4, 64)).shape == (4, 3)
    assert model(torch.zeros(4, 1, 8, 8)).shape == (4, 3)  # inputs are flattened
    assert sum(isinstance(m, torch.nn.Sigmoid) for m in model.net) == 2
    with pytest.raises(ValueError, match="activation='swish'"):
        mlp(4, [4], 2, "swish")


def test_optimizers_come_from_the_factory() -> None:
    assert isinstance(CNNClassifier().configure_optimizers(), torch.optim.Adam)
    sgd = CNNClassifier(optimizer=functools.partial(torch.optim.SGD, lr=0.099)).configure_optimizers()
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["lr"] == 0.099


def test_importing_the_modules_initialises_nothing() -> None:
    code = (
        "import sys, lightning_mpi, recipes.classification.data, recipes.classification.models;"
        "assert 'mpi4py.MPI' not in sys.modules and 'sklearn' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=Path(__file__).resolve().parents[1])


# -- IDX files -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_idx_pair_round_trip(tmp_path: Path, tiny: tuple[np.ndarray, np.ndarray], gz: bool) -> None:
    _write_pair(tmp_path, *tiny, gz=gz)
    x, y = load_idx_images(tmp_path)
    assert x.shape == (5, 1, 28, 28)
    assert x.dtype == torch.float32
    assert torch.equal(x[:, 0], torch.from_numpy(tiny[0].astype(np.float32) / 255))
    assert y.tolist() == [7, 2, 1, 0, 4]
    assert y.dtype == torch.int64


def test_wrong_magic_is_refused(tmp_path: Path, tiny: tuple[np.ndarray, np.ndarray]) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"\x1f\x8b\x08\x03" + _idx_bytes(tiny[0])[4:])
    with pytest.raises(IDXFormatError, match="magic number 0x1f8b0803"):
        read_idx(path)


def test_wrong_dimensions_are_refused(tmp_path: Path, tiny: tuple[np.ndarray, np.ndarray]) -> None:
    _write_pair(tmp_path, tiny[0], tiny[1], gz=False)
    # labels where images are expected
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(tiny[1]))
    with pytest.raises(IDXFormatError, match="1 dimension"):
        load_idx_images(tmp_path)


@pytest.mark.parametrize("cut", [3, 10, 100])
def test_truncated_file_is_refused(tmp_path: Path, tiny: tuple[np.ndarray, np.ndarray], cut: int) -> None:
    path = tmp_path / "cut"
    path.write_bytes(_idx_bytes(tiny[0])[:cut])
    with pytest.raises(IDXFormatError, match="too short|truncated"):
        read_idx(path, ndim=3)


def test_trailing_bytes_are_refused(tmp_path: Path, tiny: tuple[np.ndarray, np.ndarray]) -> None:
    path = tmp_path / "long"
    path.write_bytes(_idx_bytes(tiny[1]) + b"\x00")
    with pytest.raises(IDXFormatError, match="trailing bytes"):
        read_idx(path)


def test_truncated_gzip_is_refused(tmp_path: Path, tiny: tuple[np.ndarray, np.ndarray]) -> None:
    whole = gzip.compress(_idx_bytes(tiny[0]))
    path = tmp_path / "cut.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(IDXFormatError, match="not a complete gzip file"):
        read_idx(path)


def test_mismatched_counts_and_missing_files(tmp_path: Path, tiny: tuple[np.ndarray, np.ndarray]) -> None:
    _write_pair(tmp_path, tiny[0], tiny[1][:4])
    with pytest.raises(IDXFormatError, match="5 images but 4 labels"):
        load_idx_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_idx_images(tmp_path, split="train")
    with pytest.raises(FileNotFoundError, match="directory not found"):
        load_idx_images(tmp_path / "nowhere")


def test_shared_mnist_split_loads_and_splits_stratified() -> None:
    x, y = load_idx_images(shared_data("mnist-t10k"))
    assert x.shape == (10_000, 1, 28, 28)
    assert float(x.min()) >= 0.0
    assert float(x.max()) <= 1.0
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    train, test = stratified_split(y, 8000, 2000, seed=0)
    assert len(train) == 8000
    assert len(test) == 2000
    assert not set(train.tolist()) & set(test.tolist())
    share_all, share_test = y.bincount() / len(y), y[test].bincount() / len(test)
    assert torch.allclose(share_all, share_test, atol=0.002)


# -- digits, splits, data module ---------------------------------------------------------------------------------


def test_digits_are_resized_to_mnist_shape() -> None:
    x, y = load_digits()
    assert x.shape == (1797, 1, 28, 28)
    assert y.shape == (1797,)
    assert float(x.min()) >= 0.0
    assert float(x.max()) <= 1.0
    assert sorted(y.unique().tolist()) == list(range(10))
    assert load_digits(size=16)[0].shape == (1797, 1, 16, 16)


def test_resize_keeps_flat_images_flat_and_brightness() -> None:
    flat = torch.full((2, 1, 8, 8), 0.25)
    assert torch.allclose(resize(flat, 28), torch.full((2, 1, 28, 28), 0.25))
    image = torch.rand(1, 1, 8, 8)
    assert abs(float(resize(image, 32).mean() - image.mean())) < 0.05


def test_stratified_folds_cover_every_sample_once() -> None:
    labels = torch.arange(100) % 4
    folds = stratified_folds(labels, 5, seed=1)
    held_out = torch.cat([h for _, h in folds]).sort().values
    assert torch.equal(held_out, torch.arange(100))
    assert all(len(t) == 80 and labels[h].bincount().tolist() == [5, 5, 5, 5] for t, h in folds)


def test_data_module_batches() -> None:
    x, y = torch.randn(50, 3), torch.arange(50) % 5
    data = ClassificationDataModule.split(x, y, train_size=40, test_size=10, batch_size=8, seed=0)
    assert len(data.train_set) == 40
    assert len(data.test_set) == 10
    assert next(iter(data.train_dataloader()))[0].shape == (8, 3)
    test_y = torch.cat([b[1] for b in data.test_dataloader()])
    assert test_y.bincount().tolist() == [2, 2, 2, 2, 2]
