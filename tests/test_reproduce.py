"""The paper's reproduction (paper/, not installed) on a tiny grid, its statistics (knee, mantissa test,
aggregation) and its command ``python -m paper``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bmrs
from paper.report import CSV_COLUMNS, aggregate, build_report, knee_distances, mantissa_test
from paper.runs import METHODS, grid_jobs, run_jobs

ROOT = Path(__file__).resolve().parents[1]


def test_aggregate_mean_and_sample_std():
    rows = [{"network": "mlp", "method": "bmrs-n", "seed": s, "compression": c, "accuracy": a}
            for s, c, a in [(0, 90.0, 80.0), (1, 92.0, 82.0), (2, 94.0, 84.0)]]
    (row,) = aggregate(rows)
    assert row["seeds"] == 3 and row["compression_mean"] == pytest.approx(92.0)
    assert row["compression_std"] == pytest.approx(2.0) and row["accuracy_std"] == pytest.approx(2.0)
    assert (row["paper_compression"], row["paper_accuracy"]) == (93.20, 84.99)


def test_knee_of_a_piecewise_linear_curve_and_stop_distance():
    xs = np.linspace(0, 100, 21)
    ys = np.where(xs <= 60, 0.9 - 0.0005 * xs, 0.87 - 0.0193 * (xs - 60))  # flat, then a cliff at 60
    result = {"points": [{"compression": float(x), "accuracy": float(y)} for x, y in zip(xs, ys)],
              "stop": {"compression": 50.0, "accuracy": 0.875}}
    k = knee_distances(result)
    assert k["knee_compression"] == pytest.approx(60.0)
    assert k["compression_from_knee"] == pytest.approx(-10.0)
    assert k["accuracy_from_knee"] == pytest.approx(87.5 - 87.0, abs=1e-6)


def test_mantissa_test_accepts_log_uniform_and_rejects_uniform():
    rng = np.random.default_rng(0)
    log_uniform = np.exp(rng.uniform(np.log(1e-6), 0.0, 5000))
    assert mantissa_test(log_uniform)["p_value"] > 0.01
    assert mantissa_test(rng.uniform(0.5, 1.0, 5000))["p_value"] < 1e-6  # mantissas of U(0.5, 1) are uniform, not log-uniform


def test_tiny_grid_runs_and_reports(tmp_path):
    jobs = grid_jobs(tmp_path / "runs", [0], networks=["mlp"], methods=["none", "plain", "bmrs-n", "bmrs-n-published", "l2", "bmrs-u-4"],
                     epochs=1, finetune_epochs=1, extra={"train_subset": 300, "hidden": 16})
    order = [j.method for j in jobs]
    assert order.index("bmrs-n-published") < order.index("l2")
    assert run_jobs(jobs, workers=2, log=lambda *_: None) == []
    assert all(j.done for j in jobs)
    again = run_jobs(jobs, workers=2, log=lambda *_: None)  # finished runs are skipped
    assert again == []
    report = tmp_path / "report"
    build_report(jobs, tmp_path / "runs", report, levels=3, log=lambda *_: None)
    with open(report / "fashion-mnist.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_COLUMNS
    assert {r["method"] for r in rows} == {"none", "bmrs-n", "l2", "bmrs-u-4", "bmrs-n-published", "plain"}
    for name in ("fashion-mnist.md", "fashion-mnist-table.png", "post-training-mlp.png", "p1-sweep.png",
                 "mantissa.png", "theta-histograms.png"):
        assert (report / name).stat().st_size > 0, name
    # the report states the schedule the runs used, not the paper's
    assert "1 epochs with pruning after each, then 1 fine-tuning epochs, on 300 training" in \
        (report / "fashion-mnist.md").read_text()
    # a retrained unpruned run (a new checkpoint) invalidates the cached post-training curves
    cache = report / "post-training-mlp.json"
    before = json.loads(cache.read_text())["checkpoint"]
    checkpoint = tmp_path / "runs" / "mlp" / "none" / "seed0" / "checkpoint.pt"
    os.utime(checkpoint, ns=(checkpoint.stat().st_atime_ns, checkpoint.stat().st_mtime_ns + 10**9))
    build_report(jobs, tmp_path / "runs", report, levels=3, log=lambda *_: None)
    assert json.loads(cache.read_text())["checkpoint"] != before
    # asking for other settings over finished runs is refused, not answered with the old runs
    longer = grid_jobs(tmp_path / "runs", [0], networks=["mlp"], methods=["none", "bmrs-n"], epochs=2,
                       finetune_epochs=1, extra={"train_subset": 300, "hidden": 16})
    assert not any(j.done for j in longer)
    with pytest.raises(bmrs.ConfigError, match="other settings \\(epochs\\)"):
        run_jobs(longer, workers=1, log=lambda *_: None)


def test_agreement_verdicts():
    from paper.report import agreement
    rows = aggregate([{"network": "mlp", "method": "ev", "seed": 0, "compression": 91.8, "accuracy": 85.5},
                      {"network": "mlp", "method": "bmrs-n", "seed": 0, "compression": 0.0, "accuracy": 85.1}])
    lines = agreement(rows)
    assert lines[0].startswith("- mlp ev: agrees") and lines[1].startswith("- mlp bmrs-n: differs")


def test_goal_verdicts_against_both_unpruned_references():
    from paper.report import goal_lines
    rows = [{"network": "mlp", "method": m, "seed": 0, "compression": c, "accuracy": a}
            for m, c, a in [("none", 0.0, 87.0), ("plain", 0.0, 88.0), ("bmrs-n", 0.0, 86.0),
                            ("bmrs-n-published-detft", 90.0, 86.5), ("bmrs-n-published", 91.0, 84.9)]]
    lines = {line.split(":")[0]: line for line in goal_lines(rows)}
    assert lines["- mlp bmrs-n-published-detft"].endswith("meets the goal")  # 0.5 and 1.5 below
    assert lines["- mlp bmrs-n-published"].endswith("misses the goal")       # 2.1 below none
    assert lines["- mlp bmrs-n"].endswith("misses the goal")                 # no compression


@pytest.mark.parametrize("option, value, fragment", [("--train-subset", "0", "train_subset"),
                                                     ("--epochs", "-1", "epochs")])
def test_reproduce_checks_the_grids_settings_before_any_run(tmp_path, option, value, fragment):
    # --train-subset 0 went to the runs as "not given": every run trained on all 48,000 examples
    from paper.cli import build_parser
    from paper.reproduce import reproduce
    args = build_parser().parse_args(["fashion-mnist", "--runs", str(tmp_path / "runs"),
                                      "--report", str(tmp_path / "report"), option, value])
    with pytest.raises(bmrs.ConfigError, match=fragment):
        reproduce(args, log=lambda *_: None)
    assert not (tmp_path / "runs").exists()


def test_a_metrics_file_that_is_not_an_object_is_a_checkpoint_error(tmp_path):
    (job,) = grid_jobs(tmp_path, [0], networks=["mlp"], methods=["none"], epochs=1, finetune_epochs=0)
    job.folder.mkdir(parents=True)
    (job.folder / "metrics.json").write_text("[1]")
    with pytest.raises(bmrs.CheckpointError, match="holds a JSON list"):
        job.changed_settings()


def test_jobs_hold_configs_whose_commands_parse_back_to_them(tmp_path):
    from bmrs.cli import build_parser, train_config
    jobs = [j for j in grid_jobs(tmp_path, [0, 4]) if j.depends_on is None]
    assert {j.method for j in jobs} == set(METHODS) - {"l2"}
    for job in jobs:
        config = job.train_config()
        assert (config.seed, config.threads) == (job.seed, 1)
        command = job.command()
        assert command[-3:] == ["--output", str(job.folder), "--resume"]
        assert train_config(build_parser().parse_args(command[4:-3])) == config, job.method


def test_a_run_made_before_the_jobs_held_configs_is_still_the_same_job(tmp_path):
    # the config of paper/results/runs/goal/lenet5/bmrs-n-published-elbo-detft/seed0 (made from argv, before the
    # KL weight, the evidence margin and the noise rate were settings: the paper's values, as the recipe's)
    saved = {"dataset": "fashion-mnist", "model": "lenet5", "criterion": "bmrs-n-published", "p1": 8.0,
             "threshold": None, "amount": None, "amount_schedule": None, "epochs": 50, "finetune_epochs": 10,
             "prune_every": 1, "batch_size": 32, "lr": 0.0014, "seed": 0, "kl_reduction": "elbo",
             "finetune": "deterministic", "shrink": False, "granularity": "structure", "low": -20.0, "high": 0.0,
             "noise": True, "hidden": 150, "layers": 1, "image_size": 32, "val_fraction": 0.2, "train_subset": None,
             "data_dir": None, "download": False, "device": "auto", "threads": 1, "compile": False, "extra": {}}
    (job,) = grid_jobs(tmp_path, [0], networks=["lenet5"], methods=["bmrs-n-published-elbo-detft"])
    job.folder.mkdir(parents=True)
    (job.folder / "metrics.json").write_text(json.dumps({"config": saved}))
    assert job.done and job.changed_settings() == []
    (job.folder / "metrics.json").write_text(json.dumps({"config": {**saved, "epochs": 40, "kl_weight": 2.0}}))
    assert job.changed_settings() == ["epochs", "kl_weight"]


def test_l2_takes_its_schedule_from_the_run_it_follows(tmp_path):
    jobs = grid_jobs(tmp_path, [0], networks=["mlp"], methods=["bmrs-n-published", "l2"], epochs=3,
                     finetune_epochs=1)
    leader, l2 = jobs
    assert l2.depends_on == leader.folder
    leader.folder.mkdir(parents=True)
    history = [{"epoch": e, "pruned": True, "structures_pruned": c} for e, c in enumerate([5, 0, 7])]
    (leader.folder / "metrics.json").write_text(json.dumps({"history": [*history, {"epoch": 3}]}))
    assert l2.train_config().amount_schedule == [5, 0, 7]
    assert l2.command()[l2.command().index("--amount-schedule") + 1] == "5,0,7"
    history[1]["structures_pruned"] = -1
    (leader.folder / "metrics.json").write_text(json.dumps({"history": history}))
    with pytest.raises(bmrs.CheckpointError, match="pruning step 2"):
        l2.train_config()


def test_python_m_paper_runs_from_the_checkout_and_checks_its_options(tmp_path):
    # (what `bmrs reproduce … --levels 1` answered before the reproduction left the installed package)
    done = subprocess.run([sys.executable, "-m", "paper", "fashion-mnist", "--levels", "1", "--runs",
                           str(tmp_path / "r"), "--report", str(tmp_path / "p")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and lines[0].startswith("paper: error: --levels:"), done.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "p").exists()


def test_the_report_goes_to_paper_results_wherever_the_command_runs():
    from paper.cli import build_parser
    args = build_parser().parse_args(["fashion-mnist"])
    assert Path(args.report) == ROOT / "paper" / "results" and args.runs == "runs/reproduce/fashion-mnist"
    assert (Path(args.report) / "fashion-mnist.md").is_file() and (Path(args.report) / "fashion-mnist.csv").is_file()


@pytest.mark.parametrize("argv", [["reproduce", "fashion-mnist", "--seeds", ""],  # (settings that start no run)
                                  ["--debug", "reproduce", "fashion-mnist", "--epochs", "-1"],
                                  ["--no-progress", "reproduce", "--help"]])
def test_bmrs_reproduce_points_to_the_paper_folder(capsys, argv):
    from bmrs.cli import main
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("bmrs: error:") and "python -m paper fashion-mnist" in err, err


def test_the_installed_package_never_imports_the_paper():
    done = subprocess.run([sys.executable, "-c", "import sys, bmrs, bmrs.cli, bmrs.experiments.curve; "
                           "bmrs.cli.build_parser(); print([m for m in sys.modules if m.split('.')[0] == 'paper'])"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
