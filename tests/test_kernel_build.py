"""The kernels' build folder and lock: per version and machine, and a killed build never blocks later runs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from bmrs import _kernels


def test_build_key_names_sources_torch_interpreter_and_cpu(monkeypatch):
    key = _kernels.build_key()
    assert key.startswith("bmrs_kernels_") and key == _kernels.build_key()
    monkeypatch.setattr(_kernels, "_cpu_identity", lambda: "another CPU")
    assert _kernels.build_key() != key
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")
    assert str(_kernels._build_root()) == "/somewhere/else/bmrs"


def test_another_checkout_with_the_same_sources_builds_in_its_own_folder(monkeypatch, tmp_path):
    """ninja rebuilds when the sources' paths change: two checkouts sharing a folder rebuilt over each other."""
    key = _kernels.build_key()
    copies = []
    for source in _kernels._SOURCES + sorted(_kernels._SOURCES[0].parent.glob("*.h")):
        (tmp_path / source.name).write_bytes(source.read_bytes())
        copies.append(tmp_path / source.name)
    monkeypatch.setattr(_kernels, "_SOURCES", [c for c in copies if c.suffix == ".cpp"])
    assert _kernels.build_key() != key


def test_a_killed_build_leaves_its_lock_to_the_next_run(tmp_path):
    folder = tmp_path / "bmrs_kernels_x"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from bmrs import _kernels; "
        f"lock = _kernels._locked(Path({str(folder)!r})); lock.__enter__(); "
        f"(Path({str(folder)!r}) / 'lock').write_text(''); print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"  # a build in progress, with torch's lock file
    monkey_wait = _kernels._LOCK_WAIT_S
    try:
        _kernels._LOCK_WAIT_S = 1
        with pytest.raises(TimeoutError, match="another process"):
            with _kernels._locked(folder):
                pass
    finally:
        _kernels._LOCK_WAIT_S = monkey_wait
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    started = time.monotonic()
    with _kernels._locked(folder):  # the dead holder's lock is gone with it; torch's stale lock is removed
        assert not (folder / "lock").exists()
    assert time.monotonic() - started < 5
