"""Property tests: whatever bytes the readers get, the only exception they raise is DataError."""

from __future__ import annotations

import atexit
import gzip
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bmrs.data import read_cifar_batch, read_idx, read_image_folder, write_idx
from bmrs.errors import DataError

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# a hypothesis example runs many times per test function, so use one private folder, not tmp_path
WORK = Path(tempfile.mkdtemp(prefix="bmrs-fuzz-"))
atexit.register(shutil.rmtree, WORK, True)


def valid_idx(gz: bool) -> bytes:
    path = WORK / ("seed.gz" if gz else "seed")
    write_idx(path, np.arange(2 * 5 * 3, dtype=np.int16).reshape(2, 5, 3) - 7)
    return path.read_bytes()


VALID = {False: valid_idx(False), True: valid_idx(True)}
VALID_PICKLE = pickle.dumps(
    {b"data": np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072), b"labels": [4, 2]}, protocol=2
)
PICKLE_OPCODES = [bytes([op.code.encode("latin1")[0]]) for op in __import__("pickletools").opcodes]


def mutate(data: bytes, draw) -> bytes:
    """Apply 1-4 random edits: flip/replace bytes, truncate, insert, delete, append."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "append"]))
        pos = draw(st.integers(0, max(len(buf) - 1, 0)))
        if kind == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and buf:
            buf[pos] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del buf[pos:pos + draw(st.integers(1, 8))]
        else:
            buf += draw(st.binary(min_size=1, max_size=8))
    return bytes(buf)


def only_data_error(reader, path: Path):
    try:
        return reader(path)
    except DataError as err:
        message = str(err)
        assert message and "\n" not in message
        return None


@SETTINGS
@given(st.binary(max_size=300))
def test_idx_random_bytes(data):
    path = WORK / "random-idx"
    path.write_bytes(data)
    result = only_data_error(read_idx, path)
    assert result is None or isinstance(result, torch.Tensor)


@SETTINGS
@given(st.binary(max_size=300))
def test_idx_random_bytes_behind_gzip_magic(data):
    path = WORK / "random-gz"
    path.write_bytes(b"\x1f\x8b" + data)
    only_data_error(read_idx, path)


@SETTINGS
@given(gz=st.booleans(), data=st.data())
def test_idx_mutations(gz, data):
    path = WORK / "mutated-idx"
    path.write_bytes(mutate(VALID[gz], data.draw))
    result = only_data_error(read_idx, path)
    if result is not None:  # anything accepted must be self-consistent
        assert 1 <= result.dim() <= 4


@SETTINGS
@given(data=st.data())
def test_idx_header_mutations_of_gzip_payload(data):
    """Mutate the header inside the compression, so header checks (not CRC) must catch it."""
    raw = mutate(VALID[False][:16], data.draw) + VALID[False][16:]
    path = WORK / "header-mutated.gz"
    path.write_bytes(gzip.compress(raw))
    result = only_data_error(read_idx, path)
    if result is not None:
        assert result.numel() * result.element_size() == len(raw) - 4 - 4 * result.dim()


@SETTINGS
@given(st.binary(max_size=400))
def test_cifar_random_bytes(data):
    path = WORK / "data_batch_random"
    path.write_bytes(data)
    only_data_error(read_cifar_batch, path)


@SETTINGS
@given(st.lists(st.one_of(st.sampled_from(PICKLE_OPCODES), st.binary(min_size=1, max_size=6)), max_size=40))
def test_cifar_pickle_like_bytes(parts):
    path = WORK / "data_batch_opcodes"
    path.write_bytes(b"\x80\x02" + b"".join(parts) + b".")
    only_data_error(read_cifar_batch, path)


@SETTINGS
@given(data=st.data())
def test_cifar_mutated_batch(data):
    path = WORK / "data_batch_mutated"
    path.write_bytes(mutate(VALID_PICKLE, data.draw))
    result = only_data_error(read_cifar_batch, path)
    if result is not None:
        images, labels = result
        assert images.shape[1:] == (3, 32, 32) and len(images) == len(labels)
        assert labels.dtype == torch.int64 and (len(labels) == 0 or (labels.min() >= 0 and labels.max() <= 9))


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([".png", ".jpg", ".gif", ".bmp"]))
def test_image_folder_random_bytes(data, suffix):
    root = Path(tempfile.mkdtemp(dir=WORK))
    (root / "cls").mkdir()
    (root / "cls" / f"img{suffix}").write_bytes(data)
    only_data_error(read_image_folder, root)


def test_fuzz_inputs_are_meaningful():
    """Guard the fuzzers' seeds: the unmutated inputs must be accepted (else the fuzz tests prove nothing)."""
    for gz in (False, True):
        (WORK / "ok").write_bytes(VALID[gz])
        assert read_idx(WORK / "ok").shape == (2, 5, 3)
    (WORK / "ok").write_bytes(VALID_PICKLE)
    assert read_cifar_batch(WORK / "ok")[1].tolist() == [4, 2]
    with pytest.raises(DataError):
        (WORK / "bad").write_bytes(VALID[True][:-3])
        read_idx(WORK / "bad")
