"""Shared test helpers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


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
