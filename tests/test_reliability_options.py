"""Numeric options, fields read back from a run folder, model checksums, --data-dir and diverged training: each a
one-line error naming its source (option, or file and field)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bmrs.cli import main
from bmrs.data import load_dataset, write_idx
from bmrs.errors import DataError
from bmrs.io import load_state_dict_file, save_state_dict

TINY = ["--no-progress", "train", "--model", "mlp", "--hidden", "16", "--epochs", "1", "--finetune-epochs", "0",
        "--batch-size", "128", "--train-subset", "400", "--threads", "1"]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def run_cli(capsys, *args) -> tuple[int, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bmrs: error:") and "Traceback" not in err, err
    return code, lines[0]


@pytest.mark.parametrize("args,option", [
    (["train", "--image-size", "4294967296"], "--image-size"),
    (["train", "--hidden", "1e16"], "--hidden"),
    (["train", "--hidden", "10000000000000000"], "--hidden"),
    (["train", "--threads", "2147483648"], "--threads"),
    (["train", "--layers", "1e20"], "--layers"),
    (["train", "--layers", "100000000000000000000"], "--layers"),
    (["train", "--batch-size", "-3"], "--batch-size"),
    (["train", "--epochs", "10000000000"], "--epochs"),
    (["train", "--lr", "nan"], "--lr"),
    (["compact", "--run", "{tmp}", "--batch-size", "1e20"], "--batch-size"),
    (["compact", "--run", "{tmp}", "--batch-size", "100000000000000000000"], "--batch-size"),
    (["curve", "--run", "{tmp}", "--levels", "1e20"], "--levels"),
    (["curve", "--run", "{tmp}", "--levels", "100000000000000000000"], "--levels"),
])
def test_numeric_options_are_range_checked_naming_the_option(capsys, tmp_path, args, option):
    code, line = run_cli(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2 and option in line, line


@pytest.mark.parametrize("args,option", [(["--workers", "100000"], "--workers"), (["--seeds", ""], "--seeds")])
def test_the_paper_reproductions_options_are_range_checked_naming_the_option(capsys, tmp_path, args, option):
    from paper.cli import main as paper_main  # (python -m paper: the reproduction, outside the installed package)
    code = paper_main(["fashion-mnist", *args, "--runs", str(tmp_path / "r"), "--report", str(tmp_path / "p")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("paper: error:") and "Traceback" not in err, err
    assert code == 2 and option in lines[0] and not (tmp_path / "r").exists(), lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("opts") / "run"
    assert main([*TINY, "--criterion", "bmrs-u", "--p1", "4", "--lr", "1e-2", "--output", str(out)]) == 0
    return out


def test_a_normal_run_is_not_flagged_and_records_its_real_data_source(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["data"]["source"] == str(FASHION)  # (found by the search; config.data_dir is None)
    from bmrs.training.loop import DIVERGENCE_FACTOR
    assert max(h["train_ce"] for h in metrics["history"]) < DIVERGENCE_FACTOR * np.log(10) / 100


def _copy_run(run: Path, to: Path) -> Path:
    to.mkdir()
    for f in run.iterdir():
        if f.is_file() and not f.name.startswith("."):
            (to / f.name).write_bytes(f.read_bytes())
    return to


@pytest.mark.parametrize("field,value", [("hidden", 1e20), ("hidden", "16"), ("image_size", -1),
                                         ("epochs", 10**30), ("layers", 10**20), ("batch_size", None),
                                         ("low", "x"), ("amount_schedule", 5)])
def test_damaged_config_field_names_the_file_and_field(capsys, tiny_run, tmp_path, field, value):
    run = _copy_run(tiny_run, tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["config"][field] = value
    (run / "metrics.json").write_text(json.dumps(metrics))
    code, line = run_cli(capsys, "compact", "--run", run)
    assert code == 1 and str(run / "metrics.json") in line and f"config.{field}" in line, line


def test_flipped_bit_in_the_masked_model_is_caught(capsys, tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    model = run / "model_masked.safetensors"
    data = bytearray(model.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's bytes
    model.write_bytes(bytes(data))
    code, line = run_cli(capsys, "compact", "--run", run)
    assert code == 1 and "checksum" in line and str(model) in line, line


def test_out_of_range_kept_index_of_a_shrink_run(capsys, tmp_path):
    run = tmp_path / "shrunk"
    assert main([*TINY, "--criterion", "bmrs-n", "--evidence-margin", "50", "--shrink", "--output", str(run)]) == 0
    state = load_state_dict_file(run / "model_masked.safetensors")
    key = next(k for k in state if k.endswith("kept_index"))
    state[key] = state[key] + 1000
    save_state_dict(run / "model_masked.safetensors", state)  # (a consistent checksum: the field itself is wrong)
    code, line = run_cli(capsys, "compact", "--run", run)
    assert code == 1 and key in line and "model_masked.safetensors" in line, line


def _mnist_like(folder: Path, stems) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for stem in stems:
        n = 20
        array = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) if "images" in stem else \
            (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{stem}.gz", array)


IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.mark.parametrize("case,fragment", [("missing", "does not exist"), ("empty", "is empty"),
                                           ("file", "is a file"), ("partial", "3 of the 4")])
def test_a_given_data_dir_is_the_only_folder_used(tmp_path, case, fragment):
    assert FASHION.is_dir()  # a system copy exists, and must not be used instead
    folder = tmp_path / "data"
    if case == "empty":
        folder.mkdir()
    elif case == "file":
        folder.write_text("x")
    elif case == "partial":
        _mnist_like(folder / "fashion-mnist", IDX[:3])
    with pytest.raises(DataError) as caught:
        load_dataset("fashion-mnist", folder, progress=False)
    message = str(caught.value)
    assert fragment in message and str(folder) in message and "\n" not in message, message


def test_download_writes_into_the_given_data_dir(tmp_path, monkeypatch):
    targets = []

    def fake_download(name, target, **kwargs):
        targets.append(Path(target))
        _mnist_like(Path(target) / "fashion-mnist", IDX)
    monkeypatch.setattr("bmrs.data.datasets.download_dataset", fake_download)
    splits = load_dataset("fashion-mnist", tmp_path / "mine", download=True, progress=False)
    assert targets == [tmp_path / "mine"] and splits.source == str(tmp_path / "mine" / "fashion-mnist")


@pytest.mark.parametrize("extra", [["--lr", "1e30", "--no-noise", "--criterion", "none"],
                                   ["--lr", "1e6", "--criterion", "bmrs-u"]])
def test_diverged_training_stops_without_a_finished_result(capsys, tmp_path, extra):
    out = tmp_path / "run"
    code, line = run_cli(capsys, *TINY, *extra, "--output", out)
    assert code == 1 and ("diverged" in line or "loss became" in line), line
    assert "new --output" in line and not (out / "metrics.json").exists()


def test_out_of_range_kept_index_in_the_checkpoint_of_a_shrink_run_on_resume(tmp_path):
    """--resume rebuilds the shrunk network from the checkpoint's kept_index: a damaged one is named, not an
    IndexError."""
    import torch

    from bmrs.errors import CheckpointError
    from bmrs.io import load_checkpoint, read_json, save_checkpoint
    from bmrs.training.config import TrainConfig
    from bmrs.training.resume import restore
    from bmrs.training.run import build_for

    run = tmp_path / "shrunk"
    assert main([*TINY, "--criterion", "bmrs-n", "--evidence-margin", "50", "--shrink", "--output", str(run)]) == 0
    state = load_checkpoint(run / "checkpoint.pt")
    key = next(k for k in state["model"] if k.endswith("kept_index"))
    state["model"][key] = state["model"][key] + 1000
    save_checkpoint(run / "checkpoint.pt", state)
    metrics = read_json(run / "metrics.json")
    config = TrainConfig.from_dict(metrics["config"])
    model = build_for(config, metrics["data"]["in_channels"], metrics["data"]["num_classes"])
    example = torch.zeros(2, metrics["data"]["in_channels"], config.image_size, config.image_size)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")) as caught:
        restore(run / "checkpoint.pt", config, model, example, num_train=100)
    assert "damaged" in str(caught.value) and "another model" not in str(caught.value)  # (as it is, not re-worded)
