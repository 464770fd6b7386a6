"""Shared test helpers: ``fresh_process``, and ``kernels`` / ``kernels_on_and_off`` (the fused kernels on and off)."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch

from bmrs import _kernels


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


@pytest.fixture(params=[True, False], ids=["kernels-on", "kernels-off"])
def kernels_on_and_off(request):
    """Runs the test twice: with the fused kernels on, then off (the value is whether they are on)."""
    with _kernels_switched(request.param):
        yield request.param


def pytest_report_header(config) -> str:
    return f"bmrs kernels: {'on' if _kernels.enabled() else 'off (BMRS_KERNELS=0)'}"
