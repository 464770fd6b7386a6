"""Tests of the dataset readers (IDX, CIFAR pickles, image folders) and of load_dataset."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bmrs.data.datasets as datasets_mod
from bmrs.data import (
    FASHION_MNIST_CLASSES,
    find_dataset,
    load_dataset,
    read_cifar10,
    read_cifar_batch,
    read_idx,
    read_image_folder,
    safe_unpickle,
    write_idx,
)
from bmrs.errors import ConfigError, DataError

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")
IDX_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


def one_line_error(excinfo, *needles: str) -> str:
    """The message must be one line, mention every needle, and say what to do ('; ' then a fix)."""
    message = str(excinfo.value)
    assert "\n" not in message
    assert ";" in message, message
    for needle in needles:
        assert needle.lower() in message.lower(), (needle, message)
    return message


def random_array(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


# ----------------------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("dtype", IDX_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 3, 2), (2, 3, 2, 2), (0, 4)])
def test_idx_roundtrip(tmp_path, dtype, shape, gz):
    array = random_array(dtype, shape, seed=len(shape))
    path = tmp_path / ("a-idx.gz" if gz else "a-idx")
    write_idx(path, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == gz
    back = read_idx(path)
    assert tuple(back.shape) == shape
    assert back.dtype == torch.from_numpy(array).dtype
    np.testing.assert_array_equal(back.numpy(), array)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_idx_write_accepts_tensor(tmp_path):
    t = torch.arange(12, dtype=torch.int16).reshape(3, 4) - 6
    write_idx(tmp_path / "t", t)
    assert torch.equal(read_idx(tmp_path / "t"), t)


def test_idx_is_big_endian_on_disk(tmp_path):
    raw = bytes([0, 0, 0x0B, 1]) + struct.pack(">I", 2) + struct.pack(">hh", 258, -2)
    (tmp_path / "x").write_bytes(raw)
    assert read_idx(tmp_path / "x").tolist() == [258, -2]
    write_idx(tmp_path / "y", np.array([258, -2], dtype=np.int16))
    assert (tmp_path / "y").read_bytes() == raw


def test_idx_gzip_detected_by_magic_not_name(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    write_idx(tmp_path / "a.gz", array)
    os.rename(tmp_path / "a.gz", tmp_path / "compressed-without-suffix")
    write_idx(tmp_path / "b", array)
    os.rename(tmp_path / "b", tmp_path / "raw-with.gz")
    assert read_idx(tmp_path / "compressed-without-suffix").tolist() == list(range(10))
    assert read_idx(tmp_path / "raw-with.gz").tolist() == list(range(10))


def test_idx_write_rejects_unsupported(tmp_path):
    with pytest.raises(DataError) as e:
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))
    one_line_error(e, "int64")
    with pytest.raises(DataError):
        write_idx(tmp_path / "x", np.zeros((1,) * 5, dtype=np.uint8))
    assert not list(tmp_path.iterdir())


def idx_bytes(code=0x08, dims=(2, 3), payload=None):
    header = bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    return header + (bytes(int(np.prod(dims))) if payload is None else payload)


@pytest.mark.parametrize(
    "content, needles",
    [
        (b"", ["too short"]),
        (b"\x00\x00\x08", ["too short"]),
        (b"\x12\x34\x08\x01" + bytes(8), ["magic", "not an idx file"]),
        (idx_bytes(code=0x0A), ["dtype code 0x0A"]),
        (bytes([0, 0, 8, 0]), ["0 dimensions"]),
        (bytes([0, 0, 8, 5]) + bytes(40), ["5 dimensions"]),
        (bytes([0, 0, 8, 3]) + struct.pack(">II", 1, 1), ["header is truncated"]),
        (idx_bytes(dims=(4, 5), payload=bytes(19)), ["payload is 19 bytes", "truncated"]),
        (idx_bytes(dims=(4, 5), payload=bytes(21)), ["trailing bytes"]),
        (idx_bytes(code=0x0C, dims=(3,), payload=bytes(11)), ["needs 12"]),
        (idx_bytes(dims=(65536, 65536, 2), payload=bytes(64)), ["more than"]),
    ],
    ids=["empty", "short-header", "magic", "dtype", "ndim0", "ndim5", "dims-cut", "short", "trailing",
         "short-int32", "huge"],
)
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_idx_bad_files(tmp_path, content, needles, gz):
    path = tmp_path / "bad-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(content) if gz else content)
    with pytest.raises(DataError) as e:
        read_idx(path)
    one_line_error(e, *needles, "bad-idx1-ubyte.gz")


def test_idx_truncated_gzip(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, random_array(np.uint8, (20, 28, 28)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        read_idx(path)
    one_line_error(e, "train-images-idx3-ubyte.gz", "truncated gzip", "download")


def test_idx_corrupt_gzip(tmp_path):
    path = tmp_path / "x.gz"
    write_idx(path, random_array(np.uint8, (50, 28, 28)))
    data = bytearray(path.read_bytes())
    for i in range(30, len(data) - 20, 97):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        read_idx(path)
    one_line_error(e, "x.gz", "download")


def test_idx_bad_crc(tmp_path):
    path = tmp_path / "x.gz"
    write_idx(path, np.arange(100, dtype=np.uint8))
    data = bytearray(path.read_bytes())
    data[-8] ^= 0x01  # CRC32 in the gzip trailer
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        read_idx(path)
    one_line_error(e, "corrupt")


def test_idx_missing_and_folder(tmp_path):
    with pytest.raises(DataError) as e:
        read_idx(tmp_path / "nope")
    one_line_error(e, "not found")
    with pytest.raises(DataError) as e:
        read_idx(tmp_path)
    one_line_error(e, "folder")


# --------------------------------------------------------------------------------------- CIFAR
def make_batch(n, seed=0, labels=None, protocol=2):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist() if labels is None else labels
    batch = {b"batch_label": b"x", b"labels": labels, b"data": data, b"filenames": [b"f"] * n}
    return pickle.dumps(batch, protocol=protocol), data, labels


def make_cifar(folder: Path, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        raw, x, y = make_batch(n, seed=i)
        (folder / f"data_batch_{i}").write_bytes(raw)
        train_x.append(x)
        train_y += y
    raw, test_x, test_y = make_batch(n + 1, seed=99)
    (folder / "test_batch").write_bytes(raw)
    return np.concatenate(train_x), train_y, test_x, test_y


@pytest.mark.parametrize("nested", [True, False])
def test_cifar_reads_batches(tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    train_x, train_y, test_x, test_y = make_cifar(folder)
    x, y = read_cifar10(tmp_path, train=True)
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.tolist() == train_y
    np.testing.assert_array_equal(x.reshape(20, -1).numpy(), train_x)
    # channel planes: the first 1024 values are red
    np.testing.assert_array_equal(x[0, 0].reshape(-1).numpy(), train_x[0, :1024])
    x, y = read_cifar10(tmp_path, train=False)
    assert x.shape == (5, 3, 32, 32) and y.tolist() == test_y
    np.testing.assert_array_equal(x.reshape(5, -1).numpy(), test_x)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_cifar_batch_pickle_protocols_and_str_keys(tmp_path, protocol):
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    (tmp_path / "b").write_bytes(pickle.dumps({"data": data, "labels": np.array([3, 9])}, protocol=protocol))
    x, y = read_cifar_batch(tmp_path / "b")
    assert y.tolist() == [3, 9]
    np.testing.assert_array_equal(x.reshape(2, -1).numpy(), data)


@pytest.mark.parametrize(
    "batch, needles",
    [
        ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, ["N x 3072", "(2, 3000)"]),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, ["uint8", "float32"]),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}, ["2 images but 3 labels"]),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, ["0..9"]),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}, ["integers"]),
        ({b"data": np.zeros((2, 3072), np.uint8)}, ["lacks"]),
        ([1, 2, 3], ["should be a dict"]),
        ({b"data": [[0] * 3072], b"labels": [0]}, ["N x 3072"]),
    ],
    ids=["shape", "dtype", "count", "range", "label-type", "no-labels", "not-dict", "list-data"],
)
def test_cifar_bad_batches(tmp_path, batch, needles):
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError) as e:
        read_cifar_batch(tmp_path / "data_batch_1")
    one_line_error(e, "data_batch_1", *needles)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


def test_cifar_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Evil(marker), b"labels": [0]}, protocol=2)
    (tmp_path / "data_batch_1").write_bytes(payload)
    with pytest.raises(DataError) as e:
        read_cifar_batch(tmp_path / "data_batch_1")
    one_line_error(e, "unsafe pickle refused", "system")
    assert not marker.exists()
    for evil in (_EvalEvil(), {b"x": print}):
        with pytest.raises(DataError) as e:
            safe_unpickle(pickle.dumps(evil), "evil")
        one_line_error(e, "forbidden")
    # numpy.ndarray itself cannot be called (would allow huge allocations)
    class BigArray:
        def __reduce__(self):
            return (np.ndarray, ((2**40,),))

    with pytest.raises(DataError):
        safe_unpickle(pickle.dumps(BigArray()))

    # numpy's own rebuild path is allowed, but not for absurd sizes
    class HugeReconstruct:
        def __reduce__(self):
            return (np.ndarray.__reduce__(np.zeros(1))[0], (np.ndarray, (2**40,), b"b"))

    with pytest.raises(DataError) as e:
        safe_unpickle(pickle.dumps(HugeReconstruct()), "huge")
    one_line_error(e, "refused", "refusing to allocate")


def test_pickle_memo_bomb_is_cheap():
    """LONG_BINPUT with index 2**30 makes the C unpickler allocate 8-16 GB; ours must not."""
    start = time.perf_counter()
    assert safe_unpickle(b"\x80\x02Nr\xff\xff\xff\x3f.") is None
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("content", [b"", b"\x80\x02}q", b"not a pickle at all", bytes(range(256))])
def test_cifar_garbage(tmp_path, content):
    (tmp_path / "test_batch").write_bytes(content)
    with pytest.raises(DataError) as e:
        read_cifar_batch(tmp_path / "test_batch")
    one_line_error(e, "test_batch")


def test_cifar_missing_batches(tmp_path):
    make_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DataError) as e:
        read_cifar10(tmp_path, train=True)
    one_line_error(e, "data_batch_3", "download")
    assert read_cifar10(tmp_path, train=False)[0].shape == (5, 3, 32, 32)


# -------------------------------------------------------------------------------- image folders
def save_image(path: Path, array: np.ndarray, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def test_image_folder_class_layout(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    for cls, count in (("zebra", 2), ("ant", 3)):
        for i in range(count):
            arr = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
            save_image(tmp_path / cls / f"img{i}.png", arr)
            expected[(cls, i)] = arr
    save_image(tmp_path / "ant" / "gray.PNG", np.full((6, 5), 77, np.uint8))  # grayscale -> RGB
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    images, labels, classes = read_image_folder(tmp_path)
    assert classes == ["ant", "zebra"]
    assert images.shape == (6, 3, 6, 5) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 0, 0, 1, 1]
    # sorted file order within a class: gray.PNG, img0, img1, img2
    assert torch.all(images[0] == 77)
    np.testing.assert_array_equal(images[1].permute(1, 2, 0).numpy(), expected[("ant", 0)])
    np.testing.assert_array_equal(images[5].permute(1, 2, 0).numpy(), expected[("zebra", 1)])


def make_tiny_imagenet(root: Path, classes=("n01", "n02", "n03"), per_class=3, val_per_class=2, side=64):
    rng = np.random.default_rng(1)
    lines = []
    for c in classes:
        for i in range(per_class):
            save_image(root / "train" / c / "images" / f"{c}_{i}.JPEG", rng.integers(0, 256, (side, side, 3), np.uint8))
        (root / "train" / c / f"{c}_boxes.txt").write_text("")
    for j in range(val_per_class * len(classes)):
        c = classes[(j * 2 + 1) % len(classes)]
        save_image(root / "val" / "images" / f"val_{j}.JPEG", rng.integers(0, 256, (side, side, 3), np.uint8))
        lines.append(f"val_{j}.JPEG\t{c}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return lines


def test_image_folder_tiny_imagenet_layouts(tmp_path):
    lines = make_tiny_imagenet(tmp_path, classes=("n03", "n01", "n02"))
    x, y, classes = read_image_folder(tmp_path / "train")
    assert classes == ["n01", "n02", "n03"] and x.shape == (9, 3, 64, 64)
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # val uses the training class order, even when a different order is given
    xv, yv, cv = read_image_folder(tmp_path / "val", class_names=["n03", "n02", "n01"])
    assert cv == ["n03", "n02", "n01"] and xv.shape == (6, 3, 64, 64)
    assert yv.tolist() == [["n03", "n02", "n01"].index(line.split("\t")[1]) for line in lines]
    # resizing
    xs, _, _ = read_image_folder(tmp_path / "val", size=(16, 8))
    assert xs.shape == (6, 3, 16, 8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError) as e:
        read_image_folder(tmp_path)
    one_line_error(e, "no images found")
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DataError) as e:
        read_image_folder(tmp_path)
    one_line_error(e, "no images found")
    with pytest.raises(DataError) as e:
        read_image_folder(tmp_path / "missing")
    one_line_error(e, "not found")
    (tmp_path / "cls" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError) as e:
        read_image_folder(tmp_path)
    one_line_error(e, "broken.png", "cannot decode")


def test_image_folder_sixteen_bit_gray_empty_classes_and_repeated_names(tmp_path):
    # 16-bit grayscale is scaled to 8 bits (Pillow's convert("RGB") clipped it at 255)
    save_image(tmp_path / "a" / "1.png", np.full((4, 4), 40000, np.uint16))
    save_image(tmp_path / "a" / "2.png", np.full((4, 4), 1000, np.uint16))
    images, _, _ = read_image_folder(tmp_path)
    assert images[:, :, 0, 0].tolist() == [[156] * 3, [4] * 3]  # 40000/257, 1000/257 rounded
    # a class folder without images would be a label no example has
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError) as e:
        read_image_folder(tmp_path)
    one_line_error(e, "b hold no images")
    (tmp_path / "b").rmdir()
    with pytest.raises(DataError) as e:
        read_image_folder(tmp_path, class_names=["a", "c", "a"])
    one_line_error(e, "more than once")


def test_image_folder_size_and_class_mismatch(tmp_path):
    save_image(tmp_path / "a" / "1.png", np.zeros((4, 4, 3), np.uint8))
    save_image(tmp_path / "a" / "2.png", np.zeros((5, 4, 3), np.uint8))
    with pytest.raises(DataError) as e:
        read_image_folder(tmp_path)
    one_line_error(e, "size=(H, W)")
    assert read_image_folder(tmp_path, size=(4, 4))[0].shape == (2, 3, 4, 4)
    with pytest.raises(DataError) as e:
        read_image_folder(tmp_path, class_names=["b"], size=(4, 4))
    one_line_error(e, "not among")


def test_image_folder_annotation_errors(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "val_annotations.txt").write_text("val_0.JPEG\tn01\nbroken-line\n")
    save_image(tmp_path / "images" / "val_0.JPEG", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError) as e:
        read_image_folder(tmp_path)
    one_line_error(e, "line 2")
    (tmp_path / "val_annotations.txt").write_text("val_0.JPEG\tn01\nval_1.JPEG\tn01\n")
    with pytest.raises(DataError) as e:
        read_image_folder(tmp_path)
    one_line_error(e, "val_1.JPEG", "missing")


# -------------------------------------------------------------------------------- load_dataset
@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No system folders, no env var, download cache inside tmp: only what a test creates is found."""
    monkeypatch.setattr(datasets_mod, "SYSTEM_DATA_DIRS", ())
    monkeypatch.delenv("BMRS_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def make_mnist_like(folder: Path, n_train=50, n_test=20, seed=0, gz=True, side=28):
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for stem, array in arrays.items():
        write_idx(folder / f"{stem}{suffix}", array)
    return arrays


def check_splits(splits, n_train, n_val, n_test, channels=1, side=32):
    for ds, n in ((splits.train, n_train), (splits.val, n_val), (splits.test, n_test)):
        x, y = ds.tensors
        assert x.shape == (n, channels, side, side) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
    assert splits.in_channels == channels


def test_load_fashion_mnist_from_data_dir(isolated):
    arrays = make_mnist_like(isolated / "data" / "fashion-mnist")
    splits = load_dataset("fashion-mnist", isolated / "data", progress=False)
    check_splits(splits, 40, 10, 20)
    assert splits.num_classes == 10 and splits.class_names == FASHION_MNIST_CLASSES
    x = splits.train.tensors[0]
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std(correction=0)) - 1) < 1e-3
    # undoing the normalisation gives pixels in [0, 1]
    pixels = x * splits.std[0] + splits.mean[0]
    assert float(pixels.min()) >= -1e-5 and float(pixels.max()) <= 1 + 1e-5
    # the test images are the official test set, in order, labels unchanged
    assert splits.test.tensors[1].tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    # every training image ends up in exactly one of train/val: labels multiset is preserved
    all_labels = torch.cat([splits.train.tensors[1], splits.val.tensors[1]]).sort().values
    assert all_labels.tolist() == sorted(arrays["train-labels-idx1-ubyte"].tolist())


def test_load_resize_matches_interpolate(isolated):
    arrays = make_mnist_like(isolated / "mnist", n_train=10, n_test=3)
    splits = load_dataset("MNIST", isolated, val_fraction=0.0)
    raw = torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float().div(255).unsqueeze(1)
    expected = torch.nn.functional.interpolate(raw, size=(32, 32), mode="bilinear", antialias=True).clamp(0, 1)
    expected = (expected - splits.mean[0]) / splits.std[0]
    torch.testing.assert_close(splits.test.tensors[0], expected, atol=1e-5, rtol=1e-5)
    assert splits.class_names == tuple("0123456789") and len(splits.val) == 0


def test_load_via_env_var_flat_layout(isolated, monkeypatch):
    make_mnist_like(isolated / "flat", gz=False)
    monkeypatch.setenv("BMRS_DATA_DIR", str(isolated / "flat"))
    assert find_dataset("fashion-mnist") == isolated / "flat"
    check_splits(load_dataset("fmnist"), 40, 10, 20)


def test_flat_twin_folder_is_not_taken_for_the_other_dataset(isolated):
    """MNIST and Fashion-MNIST share file names; a folder named after one never serves the other."""
    make_mnist_like(isolated / "fashion-mnist")
    assert find_dataset("fashion-mnist", isolated / "fashion-mnist") == isolated / "fashion-mnist"
    assert find_dataset("mnist", isolated / "fashion-mnist") is None
    assert find_dataset("mnist", isolated) is None


def test_data_dir_searched_before_env(isolated, monkeypatch):
    make_mnist_like(isolated / "a" / "fashion-mnist", n_train=10)
    make_mnist_like(isolated / "b" / "fashion-mnist", n_train=30)
    monkeypatch.setenv("BMRS_DATA_DIR", str(isolated / "b"))
    assert len(load_dataset("fashion-mnist", isolated / "a").train) == 8
    assert len(load_dataset("fashion-mnist").train) == 24


def test_split_is_seeded(isolated):
    make_mnist_like(isolated / "fashion-mnist")
    a = load_dataset("fashion-mnist", isolated, split_seed=1)
    b = load_dataset("fashion-mnist", isolated, split_seed=1)
    c = load_dataset("fashion-mnist", isolated, split_seed=2)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and torch.equal(a.val.tensors[1], b.val.tensors[1])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    assert torch.equal(a.test.tensors[1], c.test.tensors[1])


def test_val_fraction_and_train_subset(isolated):
    make_mnist_like(isolated / "fashion-mnist", n_train=40)
    s = load_dataset("fashion-mnist", isolated, val_fraction=0.25, train_subset=7)
    check_splits(s, 7, 10, 20)
    full = load_dataset("fashion-mnist", isolated, val_fraction=0.25)
    # the subset is the first 7 of the same shuffled train split, normalised the same way
    assert torch.equal(s.train.tensors[0], full.train.tensors[0][:7])
    assert torch.equal(s.val.tensors[0], full.val.tensors[0])
    for bad in ({"val_fraction": 1.0}, {"val_fraction": -0.1}, {"image_size": 0}, {"train_subset": 0}):
        with pytest.raises(ConfigError):
            load_dataset("fashion-mnist", isolated, **bad)


def test_load_other_image_sizes(isolated):
    make_mnist_like(isolated / "fashion-mnist", n_train=10, n_test=2)
    check_splits(load_dataset("fashion-mnist", isolated, image_size=28), 8, 2, 2, side=28)
    check_splits(load_dataset("fashion-mnist", isolated, image_size=16), 8, 2, 2, side=16)


def test_load_cifar10(isolated):
    make_cifar(isolated / "cifar10" / "cifar-10-batches-py")
    s = load_dataset("cifar-10", isolated)
    check_splits(s, 16, 4, 5, channels=3)
    assert s.num_classes == 10 and s.class_names[0] == "airplane"
    assert len(s.mean) == 3
    assert torch.allclose(s.train.tensors[0].mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)


def test_load_tinyimagenet(isolated):
    make_tiny_imagenet(isolated / "tiny-imagenet-200", per_class=5)
    s = load_dataset("tinyimagenet", isolated)
    check_splits(s, 12, 3, 6, channels=3)
    assert s.num_classes == 3 and s.class_names == ("n01", "n02", "n03")
    check_splits(load_dataset("tiny-imagenet", isolated, image_size=64), 12, 3, 6, channels=3, side=64)


def test_unknown_dataset_name(isolated):
    with pytest.raises(DataError) as e:
        load_dataset("imagenet-22k", isolated)
    one_line_error(e, "imagenet-22k", "mnist", "fashion-mnist", "cifar10", "tinyimagenet")


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "tinyimagenet"])
def test_missing_dataset(isolated, name):
    with pytest.raises(DataError) as e:
        load_dataset(name, isolated / "nowhere")
    msg = one_line_error(e, str(isolated / "nowhere"), "--data-dir", "BMRS_DATA_DIR", "--download", "not found")
    assert ("apt-get install dataset-fashion-mnist" in msg) == (name == "fashion-mnist")


def test_incomplete_dataset_folder_is_missing(isolated):
    make_mnist_like(isolated / "fashion-mnist")
    (isolated / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", isolated)
    one_line_error(e, "not found")


def test_image_label_count_mismatch(isolated):
    folder = isolated / "fashion-mnist"
    make_mnist_like(folder, n_train=10)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(9, np.uint8))
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", isolated)
    one_line_error(e, "10 images", "9 labels", "download")


def test_bad_labels_and_images(isolated):
    folder = isolated / "fashion-mnist"
    make_mnist_like(folder, n_train=10)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.full(10, 10, np.uint8))
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", isolated)
    one_line_error(e, "0..9", "found 10..10")
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(10, np.uint8))
    write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((10, 784), np.uint8))
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", isolated)
    one_line_error(e, "N x H x W")
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", isolated)
    one_line_error(e, "train-images-idx3-ubyte.gz")


def test_real_fashion_mnist(monkeypatch):
    """CI installs Debian's dataset-fashion-mnist; this must find and load it without any option."""
    monkeypatch.delenv("BMRS_DATA_DIR", raising=False)
    assert REAL_FASHION.is_dir(), "install it: apt-get install dataset-fashion-mnist (make data)"
    assert find_dataset("fashion-mnist") == REAL_FASHION
    s = load_dataset("fashion-mnist")
    check_splits(s, 48000, 12000, 10000)
    assert s.num_classes == 10 and len(s.class_names) == 10
    assert torch.bincount(s.test.tensors[1]).tolist() == [1000] * 10
    assert torch.bincount(torch.cat([s.train.tensors[1], s.val.tensors[1]])).tolist() == [6000] * 10
    assert abs(float(s.train.tensors[0].mean())) < 1e-3
    assert 0.2 < s.mean[0] < 0.4 and 0.25 < s.std[0] < 0.45


@pytest.mark.parametrize("n_train, n_test, fragment", [(50, 0, "test files hold no images"),
                                                       (2, 20, "too few to split")])
def test_an_empty_test_set_or_validation_split_is_a_data_error(isolated, n_train, n_test, fragment):
    # an empty test set reached torch-pruning's FLOP count (ZeroDivisionError) after the whole run
    make_mnist_like(isolated / "data" / "fashion-mnist", n_train=n_train, n_test=n_test)
    with pytest.raises(DataError, match=fragment):
        load_dataset("fashion-mnist", isolated / "data", progress=False)


def test_cifar_batch_with_an_object_dtype_is_refused_not_a_crash(tmp_path):
    """A batch whose array dtype was changed to Python objects ('O8'): its raw bytes would become object
    pointers, and reading them crashed the process (found by the fuzz test). Run apart, since it could."""
    import pickle as _pickle
    import subprocess
    import sys

    import numpy as np
    batch = _pickle.dumps({b"data": np.zeros(2, dtype=np.float64) + 1e-300, b"labels": [0, 1]}, protocol=2)
    crafted = tmp_path / "data_batch_1"
    crafted.write_bytes(batch.replace(b"f8", b"O8"))
    code = ("from bmrs.data.cifar import read_cifar_batch; from bmrs.errors import DataError\n"
            f"try:\n    read_cifar_batch({str(crafted)!r})\nexcept DataError as err:\n    print('refused:', err)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    assert "refused:" in done.stdout and "Python objects" in done.stdout
