"""Tasks and data: configuration, determinism, batch shapes, the loaders and their errors,
and the synthetic task's calibration on a reduced budget (docs/tasks.md)."""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import replace
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from esper_func.core.config import CNNHostConfig, ConfigError, TransformerHostConfig
from esper_func.core.config_json import from_dict, to_dict
from esper_func.core.governor import random_guess_loss
from esper_func.data import tasks
from esper_func.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD, CIFAR10_SUBDIR
from esper_func.data.errors import TaskDataError
from esper_func.data.images import crop_and_flip
from esper_func.data.synthetic import PALETTE, PATTERNS, SHAPES, downsample, generate_synthetic, prototype_table
from esper_func.data.tasks import Task, TaskConfig, build_task, load_task_config
from esper_func.perf.calibration import train_static_host

SMALL_SYNTHETIC = TaskConfig(batch_size=16, train_iters=3, val_batches=2, n_train=200, n_val=40, n_test=40)
CIFAR_PER_FILE = 50
CIFAR_FILES = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_batches_equal(a, b) -> None:
    for name in ("train_x", "train_y", "val_x", "val_y"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# --- Configuration ---------------------------------------------------------------------------


def test_presets_and_defaults() -> None:
    assert TaskConfig() == TaskConfig.preset("synthetic")
    cifar = TaskConfig.preset("cifar10", data_dir="/data")
    assert (cifar.batch_size, cifar.train_iters, cifar.val_batches, cifar.augment) == (512, 24, 4, True)
    text = TaskConfig.preset("tinystories", context=64)
    assert (text.name, text.data_dir, text.context, text.batch_size) == ("tinystories", None, 64, 32)
    with pytest.raises(ConfigError, match="unknown task preset 'mnist'"):
        TaskConfig.preset("mnist")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "imagenet"}, "TaskConfig.name must be one of"),
        ({"batch_size": 0}, "TaskConfig.batch_size must be >= 1"),
        ({"train_iters": 0}, "TaskConfig.train_iters must be >= 1"),
        ({"val_batches": 0}, "TaskConfig.val_batches must be >= 1"),
        ({"seed": -1}, "TaskConfig.seed must be >= 0"),
        ({"n_train": 0}, "TaskConfig.n_train must be >= 1"),
        ({"n_val": 100}, r"TaskConfig.n_val=100 is smaller than val_batches \* batch_size = 2048; set n_val >= 2048"),
        ({"data_dir": "/data"}, "data_dir='/data' is not used by the synthetic task.*set data_dir to null"),
        ({"augment": True}, "augment applies to cifar10 only; set augment to false"),
        ({"name": "cifar10"}, "data_dir is required for cifar10: set it to the folder holding data_batch_1"),
        ({"name": "cifar10", "data_dir": "x", "val_batches": 200}, "exceeds the 10000 CIFAR-10 test images"),
        ({"name": "tinystories", "context": 0}, "TaskConfig.context must be >= 1"),
    ],
)
def test_config_errors_name_field_and_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TaskConfig(**kwargs)


def test_config_loads_from_dict() -> None:
    data = {"name": "cifar10", "data_dir": "/data", "batch_size": 128, "augment": False}
    assert from_dict(TaskConfig, data) == TaskConfig(name="cifar10", data_dir="/data", batch_size=128)
    assert from_dict(TaskConfig, to_dict(SMALL_SYNTHETIC)) == SMALL_SYNTHETIC
    assert load_task_config({"name": "cifar10", "data_dir": "/d"}) == TaskConfig.preset("cifar10", data_dir="/d")
    assert load_task_config({"name": "tinystories", "batch_size": 4}) == TaskConfig.preset("tinystories", batch_size=4)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['batch'\]"):
        load_task_config({"batch": 3})
    with pytest.raises(ConfigError, match="TaskConfig.batch_size: expected int"):
        from_dict(TaskConfig, {"batch_size": "64"})
    with pytest.raises(ConfigError, match=r"TaskConfig.name: 'mnist' is not one of"):
        load_task_config({"name": "mnist"})


# --- Synthetic -------------------------------------------------------------------------------


def test_synthetic_generation_is_a_function_of_the_seed() -> None:
    images, labels = generate_synthetic(64, seed=3)
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() <= 9
    again = generate_synthetic(64, seed=3)
    assert torch.equal(images, again[0]) and torch.equal(labels, again[1])
    assert not torch.equal(images, generate_synthetic(64, seed=4)[0])
    assert not torch.equal(images, generate_synthetic(64, seed=3, stream=1)[0])  # validation stream
    assert images.float().std() > 30  # not blank


def test_a_rebuilt_synthetic_task_is_rendered_once_and_equal_to_a_fresh_render(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    renders = []

    def counted(n: int, seed: int, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        renders.append((n, seed, stream))
        return generate_synthetic(n, seed, stream)

    monkeypatch.setattr(tasks, "generate_synthetic", counted)
    # A seed no other test builds, so the first build below renders its three splits.
    config = replace(
        TaskConfig.preset("synthetic"), seed=9_731, n_train=96, n_val=64, n_test=64, batch_size=16, val_batches=4
    )
    first = build_task(config)
    assert renders == [(96, 9_731, 0), (64, 9_731, 1), (64, 9_731, 2)]
    want_images, want_labels = downsample(*generate_synthetic(96, seed=9_731), 32 // config.image_size)
    assert torch.equal(first.data.images, want_images) and torch.equal(first.data.labels, want_labels)
    first.data.images.zero_()  # a caller writing into its task's data leaves the next task alone
    second = build_task(config)
    assert len(renders) == 3, "the second build rendered again"
    assert torch.equal(second.data.images, want_images) and torch.equal(second.val_x, first.val_x)
    assert not torch.equal(build_task(replace(config, seed=9_732)).data.images, want_images)


def test_prototype_table_needs_conjunctions() -> None:
    table = prototype_table()
    assert table.shape[0] == 10
    triples = [tuple(t) for t in table.view(-1, 3).tolist()]
    assert len(set(triples)) == len(triples)  # no prototype in two classes
    for per_class in table:
        for attribute in range(3):  # within a class every shape, pattern and colour differs
            assert per_class[:, attribute].unique().numel() == per_class.shape[0]
    assert (
        table[..., 0].max() < len(SHAPES) and table[..., 1].max() < len(PATTERNS) and table[..., 2].max() < len(PALETTE)
    )


def test_synthetic_task_batches() -> None:
    task = build_task(SMALL_SYNTHETIC)
    assert task.host_config == CNNHostConfig.preset("synthetic")
    assert task.num_classes == 10 and random_guess_loss(task.host_config) == pytest.approx(math.log(10))
    batches = task.sample_batches(gen(0))
    assert batches.train_x.shape == (3, 16, 3, 16, 16) and batches.train_x.dtype == torch.float32
    assert batches.train_y.shape == (3, 16) and batches.train_y.dtype == torch.int64
    assert batches.val_x.shape == (2, 16, 3, 16, 16) and batches.val_y.shape == (2, 16)
    # held out: 40 test images make 2 whole batches of 16, drawn from a third stream
    assert task.test_x.shape == (2, 16, 3, 16, 16) and task.test_y.shape == (2, 16)
    assert not torch.equal(task.test_x[0], task.val_x[0])
    for labels in (batches.train_y, batches.val_y, task.test_y):
        assert 0 <= labels.min() and labels.max() <= 9
    # normalized with the training set's own channel statistics
    assert task.data.images.shape == (200, 3, 16, 16)
    assert batches.train_x.mean().abs() < 0.3 and 0.6 < batches.train_x.std() < 1.4


def test_batches_deterministic_and_validation_fixed() -> None:
    task = build_task(SMALL_SYNTHETIC)
    first, same = task.sample_batches(gen(5)), task.sample_batches(gen(5))
    assert_batches_equal(first, same)
    other = task.sample_batches(gen(6))
    assert not torch.equal(first.train_x, other.train_x)
    assert other.val_x is first.val_x and other.val_y is first.val_y  # the same tensors every epoch
    rebuilt = build_task(SMALL_SYNTHETIC)
    assert_batches_equal(first, rebuilt.sample_batches(gen(5)))
    reseeded = build_task(replace(SMALL_SYNTHETIC, seed=1))
    assert not torch.equal(reseeded.val_x, task.val_x)
    assert not torch.equal(reseeded.data.images, task.data.images)


# --- CIFAR-10 --------------------------------------------------------------------------------


def write_cifar(folder: Path, n: int = CIFAR_PER_FILE) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Fake python-format CIFAR-10 batches: pickled dicts like the real ones."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in CIFAR_FILES:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
        written[name] = (data, labels)
    return written


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cifar")
    return root, write_cifar(root / CIFAR10_SUBDIR)


def cifar_config(data_dir: Path, **overrides) -> TaskConfig:
    return TaskConfig.preset(
        "cifar10", data_dir=str(data_dir), **{"batch_size": 10, "train_iters": 4, "val_batches": 3, **overrides}
    )


def test_cifar_loads_and_normalizes(cifar_dir: tuple[Path, dict]) -> None:
    root, written = cifar_dir
    for data_dir in (root, root / CIFAR10_SUBDIR):  # the parent and the batches folder both work
        task = build_task(cifar_config(data_dir, augment=False))
        assert task.data.images.shape == (250, 3, 32, 32) and task.data.images.dtype == torch.uint8
        expected = np.concatenate([written[f"data_batch_{k}"][0] for k in range(1, 6)])
        assert torch.equal(task.data.images.view(250, 3072), torch.from_numpy(expected))
        assert task.data.labels.tolist() == sum((written[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    test_data, test_labels = written["test_batch"]
    raw = torch.from_numpy(test_data[:30]).view(30, 3, 32, 32).float() / 255
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    assert torch.allclose(task.val_x.view(30, 3, 32, 32), (raw - mean) / std, atol=1e-6)
    assert task.val_y.view(-1).tolist() == test_labels[:30]
    # without augmentation, training images are the stored ones, normalized
    batches = task.sample_batches(gen(0))
    assert batches.train_x.shape == (4, 10, 3, 32, 32) and batches.train_y.shape == (4, 10)
    index = torch.randint(0, 250, (4, 10), generator=gen(0)).flatten()
    stored = task.data.images[index].float() / 255
    assert torch.allclose(batches.train_x.view(40, 3, 32, 32), (stored - mean) / std, atol=1e-6)
    assert torch.equal(batches.train_y.flatten(), task.data.labels[index])


def test_cifar_augmentation_deterministic(cifar_dir: tuple[Path, dict]) -> None:
    root, _ = cifar_dir
    task = build_task(cifar_config(root))
    plain = build_task(cifar_config(root, augment=False))
    a, b = task.sample_batches(gen(1)), task.sample_batches(gen(1))
    assert_batches_equal(a, b)
    assert a.train_x.shape == (4, 10, 3, 32, 32) and a.train_x.dtype == torch.float32
    assert torch.equal(a.train_y, plain.sample_batches(gen(1)).train_y)  # same indices, labels untouched
    assert not torch.equal(a.train_x, plain.sample_batches(gen(1)).train_x)
    assert not torch.equal(a.train_x, task.sample_batches(gen(2)).train_x)
    assert torch.equal(a.val_x, plain.val_x)  # validation is never augmented


def test_crop_and_flip_matches_per_image_reference() -> None:
    images = torch.rand(64, 3, 8, 8)
    out = crop_and_flip(images, gen(7), padding=2)
    replay = gen(7)
    offsets = torch.randint(0, 5, (64, 2), generator=replay)
    flips = torch.randint(0, 2, (64,), generator=replay).bool()
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for m in range(64):
        top, left = offsets[m].tolist()
        expected = padded[m, :, top : top + 8, left : left + 8]
        expected = expected.flip(-1) if flips[m] else expected
        assert torch.equal(out[m], expected)
    assert 10 < int(flips.sum()) < 54 and offsets.unique().numel() == 5


def test_cifar_missing_data_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'nope'}.*not a directory.*data_batch_1"):
        build_task(cifar_config(tmp_path / "nope"))
    write_cifar(tmp_path / "partial", n=2)
    (tmp_path / "partial" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"partial.*lacks \['data_batch_3'\].*test_batch"):
        build_task(cifar_config(tmp_path / "partial"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is not a pickle", "is not a readable pickle"),
        (pickle.dumps([1, 2, 3]), "holds list; expected a pickled dict with b'data'"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), r"holds \[b'data'\]; expected"),
        (
            pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
            r"b'data' is a uint8 array \(2, 100\)",
        ),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}), "b'data' is a float32 array"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), r"b'labels' has shape \(1,\)"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), "labels span 0..10"),
        (pickle.dumps({b"data": os.getcwd, b"labels": []}), "global posix.getcwd is not allowed"),
    ],
)
def test_cifar_malformed_file_errors(tmp_path: Path, content: bytes, message: str) -> None:
    write_cifar(tmp_path, n=2)
    (tmp_path / "data_batch_2").write_bytes(content)
    with pytest.raises(TaskDataError, match=message) as error:
        build_task(cifar_config(tmp_path, batch_size=2, val_batches=1))
    assert str(tmp_path / "data_batch_2") in str(error.value)


# --- TinyStories -----------------------------------------------------------------------------


def text_config(data_dir: Path | None = None, **overrides) -> TaskConfig:
    settings = {"context": 16, "batch_size": 5, "train_iters": 3, "val_batches": 2, **overrides}
    return TaskConfig.preset("tinystories", data_dir=None if data_dir is None else str(data_dir), **settings)


def check_windows(task: Task, train_text: bytes, val_text: bytes) -> None:
    batches = task.sample_batches(gen(0))
    for x, y in ((batches.train_x, batches.train_y), (batches.val_x, batches.val_y)):
        assert x.dtype == torch.int64 and y.dtype == torch.int64
        assert torch.equal(x[..., 1:], y[..., :-1])  # y is x shifted by one byte
        assert 0 <= x.min() and x.max() <= 255
    assert batches.train_x.shape == (3, 5, 16) and batches.val_x.shape == (2, 5, 16)
    for x, y in zip(batches.train_x.view(-1, 16), batches.train_y.view(-1, 16)):
        assert bytes(x.tolist() + y[-1:].tolist()) in train_text
    for x, y in zip(batches.val_x.view(-1, 16), batches.val_y.view(-1, 16)):
        assert bytes(x.tolist() + y[-1:].tolist()) in val_text


def test_embedded_text_task() -> None:
    task = build_task(text_config())
    host = task.host_config
    assert isinstance(host, TransformerHostConfig) and (host.vocab_size, host.context) == (256, 16)
    assert task.num_classes == 256 and random_guess_loss(task.host_config) == pytest.approx(math.log(256))
    text = resources.files("esper_func").joinpath("data/tiny_stories.txt").read_bytes()
    assert len(text) > 3000 and text.startswith(b"Once upon a time")
    n_val = math.ceil(len(text) * 0.1)  # the last 10 % validates
    assert bytes(task.data.tokens.tolist()) == text[:-n_val]
    check_windows(task, text[:-n_val], text[-n_val:])
    a, b = task.sample_batches(gen(3)), task.sample_batches(gen(3))
    assert_batches_equal(a, b)
    assert not torch.equal(a.train_x, task.sample_batches(gen(4)).train_x)
    assert a.val_x is b.val_x


def test_text_file_and_folder(tmp_path: Path) -> None:
    text = ("The cat sat on the mat. " * 40).encode() + bytes(range(256))
    single = tmp_path / "story.txt"
    single.write_bytes(text)
    task = build_task(text_config(single))
    n_val = math.ceil(len(text) * 0.1)
    assert task.data.tokens.numel() == len(text) - n_val
    check_windows(task, text[:-n_val], text[-n_val:])

    folder = tmp_path / "stories"
    folder.mkdir()
    train_text, val_text = b"abcdefghij" * 20, b"0123456789" * 5
    (folder / "TinyStories-train.txt").write_bytes(train_text)
    (folder / "TinyStories-valid.txt").write_bytes(val_text)
    task = build_task(text_config(folder))
    assert task.data.tokens.numel() == len(train_text)
    check_windows(task, train_text, val_text)


def test_text_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'missing.txt'}.*does not exist.*TinyStories-train.txt"):
        build_task(text_config(tmp_path / "missing.txt"))
    (tmp_path / "TinyStories-train.txt").write_bytes(b"x" * 100)
    with pytest.raises(FileNotFoundError, match=r"TinyStories-valid.txt.*not found"):
        build_task(text_config(tmp_path))
    (tmp_path / "TinyStories-valid.txt").write_bytes(b"")
    with pytest.raises(TaskDataError, match=r"TinyStories-valid.txt' is empty; it needs at least 17 bytes"):
        build_task(text_config(tmp_path))
    (tmp_path / "TinyStories-valid.txt").write_bytes(b"y" * 16)
    with pytest.raises(TaskDataError, match=r"has 16 bytes; it needs at least 17 bytes"):
        build_task(text_config(tmp_path))
    short = tmp_path / "short.txt"
    short.write_bytes(b"z" * 33)
    with pytest.raises(TaskDataError, match=rf"{short}.*has 33 bytes; it needs at least 34"):
        build_task(text_config(short))
    with pytest.raises(TaskDataError, match=r"embedded data/tiny_stories.txt.*needs at least"):
        build_task(text_config(context=100_000))


# --- Calibration -----------------------------------------------------------------------------


def test_synthetic_capacity_matters_on_a_reduced_budget() -> None:
    """The full-budget figures are in docs/tasks.md; here a few epochs must already show the
    ordering: the narrow synthetic host learns (well above 10 % chance) and a host four times
    as wide is clearly ahead on the same batches."""
    task = build_task(TaskConfig(n_train=4000, n_val=256, n_test=64, val_batches=4, train_iters=16))
    epochs = 8
    narrow = train_static_host(task, task.host_config, epochs, n_envs=2, seed=0)
    wide = train_static_host(task, replace(task.host_config, base_channels=32), epochs, n_envs=2, seed=0)
    narrow_acc, wide_acc = narrow.accuracy[-1].mean().item(), wide.accuracy[-1].mean().item()
    assert narrow_acc > 20.0, narrow_acc
    assert wide_acc > narrow_acc + 8.0, (narrow_acc, wide_acc)
