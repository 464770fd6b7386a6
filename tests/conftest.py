"""Shared test helpers: ``fresh_process``, ``run_cli`` (the CLI in this process), and ``kernels`` /
``kernels_on_and_off`` (the fused kernels on and off).

(The model families every training/compaction test runs on are listed in ``families.py``; the distribution
fixtures in ``test_distribution_laws.py``.)"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from bmrs import _kernels

# Under pytest-xdist (`-n N`) the workers share the cores: each takes its share of PyTorch's threads, else
# N x all-cores threads oversubscribe them (OpenMP's waiting threads then cost more than the work).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture
def fresh_process(tmp_path):
    """``check(setup, call, inputs, want, tolerance, without_bmrs=False)``: run ``setup`` (Python code that
    defines ``m``) and ``got = <call>`` in a new interpreter, where ``x`` holds ``inputs`` and ``want`` the
    expected output (both loaded weights-only), and assert the relative error is within ``tolerance``
    (``without_bmrs``: and that bmrs was never imported there)."""
    def check(setup: str, call: str, inputs, want: torch.Tensor, tolerance: float, without_bmrs: bool = False):
        torch.save(inputs, tmp_path / "fresh-inputs.pt")
        torch.save(want, tmp_path / "fresh-want.pt")
        code = (f"import sys, torch; {setup}; "
                f"x = torch.load({str(tmp_path / 'fresh-inputs.pt')!r}, weights_only=True); "
                f"want = torch.load({str(tmp_path / 'fresh-want.pt')!r}, weights_only=True); "
                f"got = ({call}).detach(); err = float((got - want).abs().max() / want.abs().max()); "
                f"assert err <= {tolerance!r}, err; "
                + ("assert 'bmrs' not in sys.modules" if without_bmrs else "pass"))
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    return check


@pytest.fixture(autouse=True)
def _thread_count_kept():
    """Each test starts on the process's thread count (a run with ``threads`` set, or the CLI in this process,
    sets PyTorch's count for the rest of the process)."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """``run_cli(*argv)``: ``bmrs.cli.main(argv)`` in this process (no ``BMRS_DATA_DIR``), as a
    ``subprocess.CompletedProcess`` with its exit code, stdout and stderr; for the tests whose point is not a
    real process (its exit status after a crash, a signal, a fresh interpreter)."""
    monkeypatch.delenv("BMRS_DATA_DIR", raising=False)

    def run(*argv) -> subprocess.CompletedProcess:
        from bmrs.cli import main

        capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit:  # (argparse's own refusals)
            code = exit.code if isinstance(exit.code, int) else 1
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(argv), code, out, err)
    return run


# -- the fused C++ kernels on and off ---------------------------------------------------------------
# The library reads BMRS_KERNELS once: `BMRS_KERNELS=0 python -m pytest tests/...` runs the numerics on the
# reference PyTorch path throughout (tests that compare the two switch the kernels on themselves).
@contextlib.contextmanager
def _kernels_switched(on: bool):
    was = _kernels.enabled()
    _kernels.set_enabled(on)
    try:
        yield
    finally:
        _kernels.set_enabled(was)  # (the state before, so a kernels-off session stays off)


@pytest.fixture
def kernels():
    """``with kernels(False): ...`` runs a block on the reference PyTorch path (``True``: the fused kernels),
    then restores the state before."""
    return _kernels_switched


@pytest.fixture
def kernels_on():
    """The fused kernels on for the test, whatever ``BMRS_KERNELS`` says (the tests of the kernels themselves:
    ``pytestmark = pytest.mark.usefixtures("kernels_on")``)."""
    with _kernels_switched(True):
        yield


@pytest.fixture(params=[True, False], ids=["kernels-on", "kernels-off"])
def kernels_on_and_off(request):
    """Runs the test twice: with the fused kernels on, then off (the value is whether they are on)."""
    with _kernels_switched(request.param):
        yield request.param


def pytest_report_header(config) -> str:
    return f"bmrs kernels: {'on' if _kernels.enabled() else 'off (BMRS_KERNELS=0)'}"
