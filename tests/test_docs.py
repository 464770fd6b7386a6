"""The API reference and documentation pages build with warnings as errors (mkdocs --strict)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_build_strictly_and_hold_the_api(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(site)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    api = (site / "api" / "index.html").read_text()
    for name in ("bmrs.nn.attach.attach", "bmrs.pruning.prune", "bmrs.compaction.compact.compact", "bmrs.saving.load",
                 "BMRSPruning", "BMRSCallback", "HeadedMultiheadAttention"):
        assert name in api, name
