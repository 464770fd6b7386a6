"""Write failures (disk full, file too large, quota, I/O error): one line naming the file, the previous file intact,
no temporary left."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch

from bmrs.errors import BMRSError, WriteError
from bmrs.io import TEMP_SUFFIX, save_checkpoint, save_state_dict, write_json

SMALL = ["--no-progress", "train", "--model", "mlp", "--hidden", "16", "--epochs", "1", "--finetune-epochs", "0",
         "--batch-size", "256", "--train-subset", "600", "--threads", "1", "--criterion", "none", "--no-noise"]


def _temporaries(folder):
    return [p.name for p in folder.iterdir() if TEMP_SUFFIX in p.name]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO])
@pytest.mark.parametrize("writer", ["json", "checkpoint", "state_dict"])
def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, code, writer):
    path = tmp_path / "out.bin"
    path.write_bytes(b"previous state")
    write = {"json": lambda: write_json(path, {"a": 1}),
             "checkpoint": lambda: save_checkpoint(path, {"w": torch.ones(3)}),
             "state_dict": lambda: save_state_dict(path, {"w": torch.ones(3)})}[writer]

    def refuse(fd):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr("bmrs.io.os.fsync", refuse)
    with pytest.raises(WriteError) as caught:
        write()
    assert isinstance(caught.value, BMRSError)
    assert str(caught.value).startswith(f"could not write {path}: {os.strerror(code)}")
    assert path.read_bytes() == b"previous state" and _temporaries(tmp_path) == []


def _limit_file_size(limit):
    def setup():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return setup


def _cli(*args, limit=None):
    return subprocess.run([sys.executable, "-m", "bmrs", *args], capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size(limit) if limit else None)


def _one_line(result, fragment):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("bmrs: error: could not write "), result.stderr
    assert fragment in lines[0] and "Traceback" not in result.stderr


@pytest.mark.slow
def test_train_with_a_file_size_limit_is_one_line_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "run"
    result = _cli(*SMALL, "--output", str(out), limit=4096)  # (the checkpoint is ~20 kB)
    _one_line(result, str(out / "checkpoint.pt"))
    assert _temporaries(out) == [] and not (out / "metrics.json").exists()


@pytest.mark.slow
def test_compact_on_a_full_disk_keeps_the_previous_model(tmp_path):
    out = tmp_path / "run"
    made = _cli(*[a if a != "none" else "bmrs-n" for a in SMALL if a != "--no-noise"], "--output", str(out))
    assert made.returncode == 0, made.stderr
    model = out / "model_compact.safetensors"
    before = model.read_bytes()
    result = _cli("compact", "--run", str(out), "--batch-size", "4", limit=len(before) // 2)
    _one_line(result, str(model))
    assert model.read_bytes() == before and _temporaries(out) == []
