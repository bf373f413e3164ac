"""Image and tabular classification data: IDX files (MNIST, Fashion-MNIST), scikit-learn digits, synthetic.

Every loader returns ``(features, labels)``: a float tensor (images ``[N, 1, H, W]`` scaled to ``[0, 1]``) and
an int64 tensor of class indices. :class:`ClassificationDataModule` splits them into a stratified train/test
pair; under :class:`~lightning_mpi.MPIStrategy` Lightning shards the training set over the ranks.
scikit-learn is imported only by the functions that need it.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

# IDX type codes (third magic byte) -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IDXFormatError(ValueError):
    """An IDX file is truncated, has a wrong magic number or does not hold what was expected."""


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw) into an array of its own shape and dtype.

    Args:
        path: the file.
        ndim: the number of dimensions the file must have (3 for images, 1 for labels); ``None``: any.

    Raises:
        IDXFormatError: wrong magic number, unexpected number of dimensions, or a payload whose size does
            not match the header (truncated or trailing bytes).
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise IDXFormatError(f"{path}: {len(raw)} bytes is too short for an IDX header (4-byte magic number).")
    zero, code, dims = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or code not in _IDX_DTYPES or dims == 0:
        raise IDXFormatError(
            f"{path}: magic number 0x{raw[:4].hex()} is not an IDX magic number (expected 0x0000TTDD with type "
            f"TT in {{{', '.join(f'{c:02x}' for c in _IDX_DTYPES)}}} and DD dimensions, e.g. 0x00000803 for images)."
        )
    if ndim is not None and dims != ndim:
        raise IDXFormatError(f"{path}: holds {dims} dimension(s), expected {ndim} (magic 0x{raw[:4].hex()}).")
    header = 4 + 4 * dims
    if len(raw) < header:
        raise IDXFormatError(f"{path}: truncated header ({len(raw)} bytes, the {dims} sizes need {header}).")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "has trailing bytes"
        raise IDXFormatError(
            f"{path}: {problem}: the header announces shape {shape} ({expected} bytes in all), the file has {len(raw)}."
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, gzip.BadGzipFile, OSError) as err:
        raise IDXFormatError(f"{path}: not a complete gzip file ({err}).") from err


def find_idx(root: str | os.PathLike, split: str, kind: str) -> Path:
    """The file ``{split}-{kind}-idx{n}-ubyte`` in ``root``, gzipped or raw (``kind``: images or labels)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"IDX directory not found: {root.resolve()}. Point data.source.root= at a directory with MNIST's IDX files "
            "(docs/recipes.md says where to download them), or run on the embedded digits with data=digits."
        )
    n = 3 if kind == "images" else 1
    stem = f"{split}-{kind}-idx{n}-ubyte"
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Neither {stem}.gz nor {stem} in {root.resolve()} (MNIST/Fashion-MNIST file names); the embedded "
        "alternative needs no file: data=digits."
    )


def load_idx_images(root: str | os.PathLike, split: str = "t10k") -> tuple[Tensor, Tensor]:
    """Images ``[N, 1, H, W]`` in ``[0, 1]`` and labels ``[N]`` of an MNIST-style IDX pair in ``root``.

    Works for MNIST and Fashion-MNIST (``split``: ``"train"`` or ``"t10k"``).
    """
    images = read_idx(find_idx(root, split, "images"), ndim=3)
    labels = read_idx(find_idx(root, split, "labels"), ndim=1)
    if len(images) != len(labels):
        raise IDXFormatError(f"{root}: {len(images)} images but {len(labels)} labels in split {split!r}.")
    features = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return features, torch.from_numpy(labels.astype(np.int64))


def load_digits(size: int = 28) -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled handwritten digits (1,797 real 8x8 images), resized bilinearly to ``size`` x ``size``.

    The default 28 makes them the shape of MNIST, so the study's CNN applies unchanged.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    return resize(small, size), torch.from_numpy(digits.target.astype(np.int64))


def resize(images: Tensor, size: int) -> Tensor:
    """Bilinear resize of ``[N, C, H, W]`` images to ``size`` x ``size``, clamped to ``[0, 1]``."""
    out = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return out.clamp_(0.0, 1.0)


def make_synthetic(
    n_samples: int = 20_000,
    n_features: int = 64,
    n_informative: int = 32,
    n_classes: int = 10,
    class_sep: float = 1.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """A synthetic classification problem from scikit-learn's ``make_classification`` (the MLP speed-up study)."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=n_samples,
        n_features=n_features,
        n_informative=n_informative,
        n_redundant=0,
        n_classes=n_classes,
        class_sep=class_sep,
        random_state=seed,
    )
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))


def stratified_split(
    labels: Tensor, train_size: float | None, test_size: float | None, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Indices of a stratified train/test split (sizes as counts or fractions, as in scikit-learn).

    Every rank calling this with the same ``seed`` gets the same split.
    """
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    train, test = train_test_split(
        index, train_size=train_size, test_size=test_size, stratify=labels.numpy(), random_state=seed
    )
    return torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(test))


def stratified_folds(labels: Tensor, folds: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """``(train, held_out)`` indices of each fold of a stratified, shuffled k-fold split."""
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [
        (torch.from_numpy(train), torch.from_numpy(held_out))
        for train, held_out in splitter.split(np.zeros(len(labels)), labels.numpy())
    ]


class ClassificationDataModule(LightningDataModule):
    """In-memory train and test sets; test and predict read the test set in order.

    There is no validation set, so that ``fit`` times training alone.

    Args:
        features, labels: the whole data set (see the loaders of this module).
        train_index, test_index: the rows of each set (e.g. from :func:`stratified_split`).
        batch_size: samples per batch on each rank.
    """

    def __init__(
        self, features: Tensor, labels: Tensor, train_index: Tensor, test_index: Tensor, batch_size: int = 64
    ) -> None:
        super().__init__()
        self.train_set = TensorDataset(features[train_index], labels[train_index])
        self.test_set = TensorDataset(features[test_index], labels[test_index])
        self.batch_size = batch_size

    @classmethod
    def split(
        cls,
        features: Tensor,
        labels: Tensor,
        train_size: float | None = None,
        test_size: float | None = 0.2,
        batch_size: int = 64,
        seed: int = 0,
    ) -> ClassificationDataModule:
        """A data module over a stratified train/test split of ``features`` and ``labels``."""
        train, test = stratified_split(labels, train_size, test_size, seed)
        return cls(features, labels, train, test, batch_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def test_dataloader(self) -> DataLoader:
        return self._in_order(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._in_order(self.test_set)

    def _in_order(self, dataset: TensorDataset) -> DataLoader:
        return DataLoader(dataset, batch_size=max(self.batch_size, 256), shuffle=False)
