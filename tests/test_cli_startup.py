"""The command line's help and argument checks start without importing torch (well under a second)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _modules_after(code: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", code + "; import sys; print(' '.join(sys.modules))"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_help_and_parsing_do_not_import_torch():
    loaded = _modules_after("from bmrs.cli import build_parser; p = build_parser(); "
                            "p.parse_args(['train', '--no-progress']); p.format_help()")
    assert "torch" not in loaded and "numpy" not in loaded
    assert "torch" not in _modules_after("import bmrs, bmrs.defaults; bmrs.__version__")


def test_lazy_package_still_serves_every_public_name():
    import bmrs

    for name in bmrs.__all__:
        assert getattr(bmrs, name) is not None, name
    assert set(bmrs.__all__) <= set(dir(bmrs))


@pytest.mark.slow
def test_output_survives_a_terminal_that_cannot_encode_it(tmp_path):
    import os

    done = subprocess.run([sys.executable, "-m", "bmrs", "train", "--model", "mlp", "--hidden", "8", "--train-subset",
                           "300", "--epochs", "1", "--finetune-epochs", "0", "--threads", "1", "--output",
                           str(tmp_path / "run")], capture_output=True, timeout=600,
                          env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0, done.stderr[-1000:]
    assert b"\\u03c3" in done.stdout  # the note's sigma, escaped rather than a UnicodeEncodeError
