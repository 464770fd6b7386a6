"""Packaging: the core installs only what pruning needs, and works without the optional extras."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from bmrs.extras import MissingExtraError, require

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("matplotlib", "scipy", "kneed", "PIL", "ninja", "onnx", "onnxscript", "onnxruntime", "transformers",
            "lightning", "pytorch_lightning", "accelerate")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_core_dependencies_are_what_pruning_needs():
    names = {re.split(r"[<>=!~\[ ]", spec)[0].lower() for spec in _project()["dependencies"]}
    assert names == {"torch", "numpy", "torch-pruning", "tqdm", "safetensors"}
    pruning = next(spec for spec in _project()["dependencies"] if spec.startswith("torch-pruning"))
    assert "<" in pruning  # its graph API is used: capped at the tested minor version
    extras = _project()["optional-dependencies"]
    assert {"kernels", "plots", "paper", "export", "transformers", "lightning", "all"} <= set(extras)
    assert (ROOT / "LICENSE").is_file() and (ROOT / "CITATION.cff").is_file() and (ROOT / "CHANGELOG.md").is_file()
    assert (ROOT / "src" / "bmrs" / "py.typed").is_file()


def test_require_names_the_extra():
    assert require("json", "plots").__name__ == "json"
    with pytest.raises(MissingExtraError, match=r"pip install 'bmrs\[plots\]'"):
        require("surely_not_installed_module_xyz.pyplot", "plots", "drawing")


@pytest.mark.slow
def test_the_core_works_without_the_optional_packages(tmp_path):
    """attach → train steps → prune → compact → save/load, and a short `bmrs train`, with every optional
    package made unimportable."""
    shadows = tmp_path / "shadows"  # a package of each name whose import fails, first on the path
    for name in OPTIONAL:
        (shadows / name).mkdir(parents=True)
        (shadows / name / "__init__.py").write_text(f"raise ModuleNotFoundError('{name} is not installed (test)')")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(shadows)!r})
        blocked = {OPTIONAL!r}
        import torch, bmrs
        torch.manual_seed(0)
        net = lambda: torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
        model = bmrs.attach(net())
        optimizer = torch.optim.Adam(bmrs.param_groups(model, lr=1e-2))
        x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(model(x), y) + 0.3 * bmrs.kl_loss(model, "structure-mean")
            optimizer.zero_grad(); loss.backward(); optimizer.step()
        bmrs.noise_layers(model)[0][1].mask[:20] = 0
        small = bmrs.compact(model.eval(), x[:2])
        bmrs.save(small, {str(tmp_path / 'small.safetensors')!r})
        again = bmrs.load({str(tmp_path / 'small.safetensors')!r}, net)
        assert again[0].out_features == 12
        from bmrs.cli import main
        code = main(["train", "--model", "mlp", "--hidden", "16", "--epochs", "1", "--finetune-epochs", "0",
                     "--train-subset", "512", "--batch-size", "128", "--output", {str(tmp_path / 'run')!r},
                     "--no-progress", "--threads", "1"])
        assert code in (0, None), code
        assert not [m for m in sys.modules if m.split(".")[0] in blocked], "an optional package was imported"
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "BMRS_KERNELS": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert not (tmp_path / "run" / "history.png").exists()  # no matplotlib: no plot, and no error


def test_commands_that_need_an_extra_say_so_before_working(tmp_path):
    shadow = tmp_path / "matplotlib"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError('matplotlib is not installed (test)')")
    done = subprocess.run([sys.executable, "-m", "bmrs", "curve", "--run", str(tmp_path / "no-run")],
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{ROOT / 'src'}"})
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == ["bmrs: error: matplotlib is needed for drawing curve.png but not "
                                                "installed: pip install 'bmrs[plots]' (or pip install matplotlib)"]
