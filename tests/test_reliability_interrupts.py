"""curve, compact and reproduce interrupted: outputs as one consistent set, advice that works, children stopped,
a report never replaced by one built from fewer runs; and the API cases of round two."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import bmrs
from bmrs.cli import main
from bmrs.errors import ConfigError, WriteError
from bmrs.experiments.curve import run_curve
from bmrs.io import TEMP_SUFFIX, staged_outputs, write_json
from paper import runs as reproduce_runs

TINY = ["--no-progress", "train", "--model", "mlp", "--hidden", "16", "--epochs", "1", "--finetune-epochs", "0",
        "--batch-size", "128", "--train-subset", "400", "--threads", "1", "--criterion", "bmrs-n"]


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if TEMP_SUFFIX in p.name]


@pytest.mark.parametrize("failure", [KeyboardInterrupt, WriteError])
def test_a_staged_set_is_all_or_nothing(tmp_path, failure):
    with staged_outputs(tmp_path) as stage:
        write_json(stage / "a.json", 1)
        write_json(stage / "b.json", 1)
    with pytest.raises(failure):
        with staged_outputs(tmp_path) as stage:
            write_json(stage / "a.json", 2)
            raise failure("stopped between the two files")
    assert json.loads((tmp_path / "a.json").read_text()) == 1 and _leftovers(tmp_path) == []


def test_ctrl_c_during_the_renames_acts_after_the_whole_set(tmp_path, monkeypatch):
    """The signal reaches the process while the first file is moved; another thread is there to take it (as
    PyTorch's are), so a signal mask on the main thread alone would let it split the set."""
    with staged_outputs(tmp_path) as stage:
        write_json(stage / "a.json", 1)
        write_json(stage / "b.json", 1)
    bystander_stop = threading.Event()
    bystander = threading.Thread(target=bystander_stop.wait)
    bystander.start()
    real_replace = os.replace

    def replace_then_signal(source, target):
        real_replace(source, target)
        if Path(target) == tmp_path / "a.json":  # (the move out of the stage, not the write into it)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # (time for whichever thread takes it, then for the handler to run)
    monkeypatch.setattr(os, "replace", replace_then_signal)
    try:
        with pytest.raises(KeyboardInterrupt):
            with staged_outputs(tmp_path) as stage:
                write_json(stage / "a.json", 2)
                write_json(stage / "b.json", 2)
    finally:
        bystander_stop.set()
        bystander.join()
    assert [json.loads((tmp_path / name).read_text()) for name in ("a.json", "b.json")] == [2, 2]
    assert _leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("intr") / "run"
    assert main([*TINY, "--output", str(out)]) == 0
    return out


@pytest.mark.slow
def test_interrupted_curve_keeps_the_previous_set(run, tmp_path, monkeypatch):
    out = tmp_path / "curve"
    run_curve(run, ["l2"], out, levels=3, progress=False, log=lambda _: None)
    before = {name: (out / name).read_bytes() for name in ("curve.json", "curve.csv", "curve.png")}
    (out / f".stage.killed{TEMP_SUFFIX}").mkdir()  # what a SIGKILLed sweep leaves

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("bmrs.experiments.curve.plot_curves", interrupted)  # after curve.json and .csv
    with pytest.raises(KeyboardInterrupt):
        run_curve(run, ["l2", "ev"], out, levels=4, progress=False, log=lambda _: None)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert _leftovers(out) == []


def test_sigterm_stops_a_command_even_where_a_library_swallows_the_first_interrupt(capsys):
    """A KeyboardInterrupt raised inside a bare ``except:`` (torch-pruning has one) is lost; SIGTERM raises it
    again until the command stops."""
    from bmrs.cli import INTERRUPT_REPEAT_S, run_command

    swallowed, before = [], [signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGALRM)]

    def command(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except BaseException as err:  # noqa: BLE001 (the library that swallows it)
            swallowed.append(type(err).__name__)
        deadline = time.monotonic() + 20 * INTERRUPT_REPEAT_S
        while time.monotonic() < deadline:
            time.sleep(0.01)
        return 0

    assert run_command(command, Namespace(debug=False), "rerun") == 130
    assert swallowed == ["KeyboardInterrupt"] and "interrupted; rerun" in capsys.readouterr().err
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # no repeat left armed
    assert [signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGALRM)] == before  # handlers put back


def test_the_repeated_interrupt_lets_cleanup_run_to_its_end(capsys):
    """Cleanup while the interrupt propagates (a finally block stopping children, say) outlasts the repeats."""
    from bmrs.cli import INTERRUPT_REPEAT_S, run_command

    cleaned = []

    def command(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            deadline = time.monotonic() + 4 * INTERRUPT_REPEAT_S
            while time.monotonic() < deadline:
                time.sleep(0.01)
            cleaned.append(True)
        return 0

    assert run_command(command, Namespace(debug=False), "rerun") == 130 and cleaned == [True]
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_curve_interrupted_from_the_cli_gives_advice_that_works(run, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("bmrs.experiments.curve.sweep", interrupted)
    assert main(["curve", "--run", str(run), "--output", str(tmp_path / "c"), "--levels", "3"]) == 130
    err = capsys.readouterr().err
    assert "--resume" not in err and "rerun the same command" in err


@pytest.mark.slow
def test_sigterm_stops_curve_cleanly(run, tmp_path):
    out = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-m", "bmrs", "--no-progress", "curve", "--run", str(run), "--output",
                             str(out), "--levels", "200", "--criteria", "l2,ev,snr"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first = proc.stdout.readline()  # one criterion swept: the process is inside the sweeps (about 20 s more)
    assert first.startswith("l2:"), first + proc.stderr.read()
    assert proc.poll() is None, "the sweeps ended before the signal could be sent"
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and "rerun the same command" in err, \
        f"exit {proc.returncode}; stdout after the signal: {rest!r}; curve.json written: " \
        f"{(out / 'curve.json').exists()}; stderr: {err}"
    assert not (out / "curve.json").exists() and _leftovers(out) == []


def test_reproduce_stops_its_children_when_interrupted(tmp_path, monkeypatch):
    jobs = reproduce_runs.grid_jobs(tmp_path / "runs", [0], networks=["mlp"], methods=["none", "plain"])
    started = []
    real_popen = subprocess.Popen

    def popen(command, **kwargs):
        proc = real_popen([sys.executable, "-c", "import time; time.sleep(120)"], **kwargs)
        started.append(proc)
        return proc

    real_sleep, interrupted = time.sleep, []

    def sleep(seconds):
        if len(started) == 2 and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt  # Ctrl-C, or SIGTERM turned into it by the CLI
        real_sleep(min(seconds, 0.01))
    monkeypatch.setattr(reproduce_runs.subprocess, "Popen", popen)
    monkeypatch.setattr(reproduce_runs.time, "sleep", sleep)
    t0 = time.time()
    with pytest.raises(KeyboardInterrupt):
        reproduce_runs.run_jobs(jobs, workers=2, log=lambda _: None, progress=False)
    assert len(started) == 2 and all(p.poll() is not None for p in started) and time.time() - t0 < 60


def _reproduce_args(tmp_path, **kw):
    args = dict(dataset="fashion-mnist", seeds=[0], workers=1, epochs=1, finetune_epochs=0, train_subset=None,
                levels=3, runs=str(tmp_path / "mistyped"), report=str(tmp_path / "report"), report_only=True,
                force=False)
    return Namespace(**{**args, **kw})


def test_report_only_never_replaces_a_report_built_from_more_runs(tmp_path, capsys):
    report = tmp_path / "report"
    report.mkdir()
    (report / "fashion-mnist.md").write_text("runs in `runs/x`, 40 of 78 finished; …")
    before = (report / "fashion-mnist.md").read_bytes()
    from paper.cli import main as paper_main
    code = paper_main(["fashion-mnist", "--report-only", "--runs", str(tmp_path / "mistyped"), "--report", str(report)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "40 finished runs" in err and "--force" in err, err
    assert (report / "fashion-mnist.md").read_bytes() == before
    from paper.reproduce import reproduce
    assert reproduce(_reproduce_args(tmp_path, force=True), log=lambda _: None, progress=False) == 0
    assert json.loads((report / "report.json").read_text())["finished_runs"] == 0
    with pytest.raises(ConfigError):  # (an empty report does not block a fuller one, but the manifest counts)
        (report / "report.json").write_text(json.dumps({"finished_runs": 3}))
        reproduce(_reproduce_args(tmp_path), log=lambda _: None, progress=False)


def test_compact_with_a_nan_example_input_says_so():
    model = bmrs.attach(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.ReLU(),
                                            torch.nn.Linear(3, 2)))
    x = torch.randn(2, 4)
    x[0, 1] = math.nan
    with pytest.raises(ConfigError, match="NaN"):
        bmrs.compact(model, x)


def test_log_uniform_bounds_from_python_floats_keep_float64():
    import mpmath

    q = bmrs.TruncatedLogNormal(torch.tensor(-16.0, dtype=torch.float64), torch.tensor(math.exp(-8), dtype=torch.float64))
    reduced = bmrs.TruncatedLogUniform(-23 * math.log(2), 0.0)
    got = float(bmrs.delta_f(q, bmrs.TruncatedLogUniform(-20.0, 0.0), reduced))
    mpmath.mp.dps = 50
    mu, sigma, low = mpmath.mpf(-16), mpmath.exp(-8), -23 * mpmath.log(2)
    mass = mpmath.ncdf((mu - low) / sigma) - mpmath.ncdf(mu / sigma)  # q's mass in [low, 0] (its own ≈ 1)
    want = float(mpmath.log(mass) + mpmath.log(20) - mpmath.log(-low))
    assert abs(got - want) <= 1e-9 * abs(want), (got, want)
    assert float(reduced.low) == -23 * math.log(2)


def test_resnet18_trains_on_a_last_batch_of_one():
    from bmrs.models import build_model
    from bmrs.training.loop import train_epoch

    torch.manual_seed(0)
    model = build_model("resnet18", in_channels=1, num_classes=10, image_size=16)
    data = TensorDataset(torch.randn(5, 1, 16, 16), torch.randint(0, 10, (5,)))
    stats = train_epoch(model, torch.optim.Adam(model.parameters(), lr=1e-3), data, batch_size=2,
                        generator=torch.Generator().manual_seed(0), progress=False)
    assert math.isfinite(stats["loss"])
