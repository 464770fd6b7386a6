"""A run folder is written by one bmrs process at a time; a dead owner's lock is taken over."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

import bmrs
from bmrs.io import FolderLock
from bmrs.training import TrainConfig, train


def test_a_second_writer_is_refused_and_a_dead_owner_releases(tmp_path):
    folder = tmp_path / "run"
    owner = subprocess.Popen([sys.executable, "-c", (
        "import time; from bmrs.io import FolderLock; "
        f"lock = FolderLock({str(folder)!r}, 'train').__enter__(); print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    assert owner.stdout.readline().strip() == "held"
    config = TrainConfig(model="mlp", hidden=8, criterion="none", epochs=0, finetune_epochs=1, train_subset=300)
    with pytest.raises(bmrs.ConfigError, match=rf"in use by another bmrs process \(pid {owner.pid}\)"):
        train(config, folder, progress=False, log=lambda _: None)
    assert not (folder / "checkpoint.pt").exists()
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    with FolderLock(folder, "train"):  # the kernel released the dead owner's lock
        pass
