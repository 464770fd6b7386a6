"""The README's quick start runs as written, on real Fashion-MNIST, and prunes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _block_after(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_quick_start_runs_as_written(tmp_path):
    code = _block_after("## Quick start")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    pruned = [float(v) for v in re.findall(r"epoch \d+: ([\d.]+)% of structures pruned", done.stdout)]
    assert len(pruned) == 3 and pruned[-1] > 20, done.stdout  # it prunes, with the defaults shown
    assert (tmp_path / "small.safetensors").is_file()
    first = re.search(r"Linear\(in_features=1024, out_features=(\d+)", done.stdout)
    assert first and int(first.group(1)) < 256, done.stdout  # the reloaded model is the small one
