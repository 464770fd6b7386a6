"""bmrs.compaction.export on a full disk or an unwritable folder: WriteError naming the file (not ModelError),
the previous export intact, no temporary left."""

from __future__ import annotations

import errno
import importlib
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch

import bmrs
from bmrs.compaction import export
from bmrs.errors import ModelError, WriteError
from bmrs.io import TEMP_SUFFIX

EXPORT = importlib.import_module("bmrs.compaction.export")  # (the module: bmrs.compaction.export is the function)


def _small():
    torch.manual_seed(0)
    model = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)))
    bmrs.noise_layers(model)[0][1].mask[:4] = 0
    return bmrs.compact(model.eval(), torch.randn(2, 6))


def _refuse(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_a_full_disk_is_a_write_error_and_keeps_the_previous_export(tmp_path, monkeypatch, fmt):
    path = tmp_path / f"small.{fmt}"
    path.write_bytes(b"previous export")
    if fmt == "pt2":  # where bmrs writes the program's bytes
        monkeypatch.setattr(EXPORT.os, "fsync", _refuse)
    else:  # where torch's ONNX exporter writes the file
        import onnx_ir
        monkeypatch.setattr(onnx_ir, "save", _refuse)
    with pytest.raises(WriteError) as caught:
        export(_small(), torch.randn(2, 6), path)
    assert not isinstance(caught.value, ModelError)
    assert str(caught.value).startswith(f"could not write {path}: No space left on device")
    assert path.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir() if TEMP_SUFFIX in p.name] == []


def test_an_unwritable_folder_is_a_write_error(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(EXPORT.tempfile, "mkstemp", denied)
    with pytest.raises(WriteError, match="could not write .*small.pt2: Permission denied"):
        export(_small(), torch.randn(2, 6), tmp_path / "small.pt2")
    (tmp_path / "file").write_text("")
    with pytest.raises(bmrs.ConfigError, match="is a file, not a folder"):
        export(_small(), torch.randn(2, 6), tmp_path / "file" / "small.pt2")


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_a_real_write_past_the_file_size_limit_is_a_write_error(tmp_path):
    # torch's own .pt2 writer reports such a write as "unexpected pos": bmrs writes the bytes itself
    script = ("import torch, bmrs\n"
              "from bmrs.compaction import export\n"
              "model = torch.nn.Linear(64, 64).eval()\n"
              "try:\n"
              f"    export(model, torch.randn(2, 64), {str(tmp_path / 'big.pt2')!r})\n"
              "except Exception as err:\n"
              "    print(type(err).__name__, err)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            preexec_fn=_limit_file_size, env={**os.environ, "BMRS_KERNELS": "0"})
    assert result.stdout.startswith("WriteError could not write "), result.stdout + result.stderr
    assert "File too large" in result.stdout
    assert list(tmp_path.iterdir()) == []
