"""CIFAR-10 from its python-format batch files, read with an unpickler that admits numpy
arrays only, and checked against the format so that a wrong file names itself."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from esper_func.data.errors import TaskDataError
from esper_func.data.images import NUM_IMAGE_CLASSES

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{k}" for k in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_SUBDIR = "cifar-10-batches-py"
CIFAR10_TEST_SIZE = 10_000


def cifar10_folder(data_dir: str | Path) -> Path:
    """The folder holding the CIFAR-10 batches: `data_dir` itself or `data_dir/cifar-10-batches-py`."""
    root = Path(data_dir)
    expected = (
        f"expected the python-format CIFAR-10 batches {', '.join(CIFAR10_TRAIN_FILES)}, {CIFAR10_TEST_FILE} "
        f"in that folder or in its subfolder {CIFAR10_SUBDIR}/"
    )
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 data_dir {str(root)!r} is not a directory; {expected}")
    nested = root / CIFAR10_SUBDIR
    folder = nested if nested.is_dir() else root
    missing = [name for name in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 folder {str(folder)!r} lacks {missing}; {expected}")
    return folder


def load_cifar10(data_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test images uint8 `[n, 3, 32, 32]` and labels int64 `[n]` from the python-format batches."""
    folder = cifar10_folder(data_dir)
    train = [read_cifar10_batch(folder / name) for name in CIFAR10_TRAIN_FILES]
    test_images, test_labels = read_cifar10_batch(folder / CIFAR10_TEST_FILE)
    train_images = torch.cat([images for images, _ in train])
    train_labels = torch.cat([labels for _, labels in train])
    return train_images, train_labels, test_images, test_labels


CIFAR10_FORMAT = (
    "a pickled dict with b'data' (numpy uint8 array [n, 3072], each row 1024 red, 1024 green, "
    "1024 blue values of a 32x32 image) and b'labels' (n integers in 0..9)"
)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a CIFAR batch needs nothing else,
    and refusing other globals keeps a hostile file from running code."""

    ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.numeric", "_frombuffer"),  # protocol 5
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core."):  # numpy 1.x names (the real files); numpy 2 moved them
            module = "numpy._core." + module.removeprefix("numpy.core.")
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def _unpickle(handle: BinaryIO) -> Any:
    return _NumpyOnlyUnpickler(handle, encoding="bytes").load()


def read_cifar10_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One python-format batch file -> uint8 images `[n, 3, 32, 32]`, int64 labels `[n]`."""
    with open(path, "rb") as handle:
        try:
            batch = _unpickle(handle)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
            raise TaskDataError(
                f"{str(path)!r} is not a readable pickle ({error}); expected {CIFAR10_FORMAT}"
            ) from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise TaskDataError(f"{str(path)!r} holds {keys}; expected {CIFAR10_FORMAT}")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} array {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise TaskDataError(f"{str(path)!r}: b'data' is a {found}; expected {CIFAR10_FORMAT}")
    label_array = np.asarray(labels)
    if label_array.shape != (data.shape[0],) or not np.issubdtype(label_array.dtype, np.integer):
        raise TaskDataError(
            f"{str(path)!r}: b'labels' has shape {label_array.shape} and dtype {label_array.dtype} for "
            f"{data.shape[0]} images; expected {CIFAR10_FORMAT}"
        )
    if label_array.size and (label_array.min() < 0 or label_array.max() >= NUM_IMAGE_CLASSES):
        raise TaskDataError(
            f"{str(path)!r}: labels span {label_array.min()}..{label_array.max()}; expected {CIFAR10_FORMAT}"
        )
    images = torch.from_numpy(data.copy()).view(-1, 3, 32, 32)
    return images, torch.from_numpy(label_array.astype(np.int64))
