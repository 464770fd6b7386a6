"""The training engine on real Fashion-MNIST slices: pruning, compaction, resume, CLI."""

from __future__ import annotations

import json

import pytest
import torch

import bmrs
from bmrs.data import load_dataset
from bmrs.training import TrainConfig, train
from bmrs.training.config import comparable_settings
from bmrs.training import run as run_module

FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def fmnist_slice():
    return load_dataset("fashion-mnist", train_subset=3000, progress=False)


def quiet(_msg):
    pass


def test_config_validation_messages():
    for kwargs, fragment in [
        ({"p1": 23}, "p1 must be"), ({"p1": 0}, "p1 must be"), ({"epochs": -1}, "epochs must be"),
        ({"batch_size": 0}, "batch_size must be"), ({"criterion": "magic"}, "unknown criterion"),
        ({"model": "alexnet"}, "unknown model"), ({"lr": 0.0}, "lr must be"),
        ({"criterion": "l2"}, "--amount"), ({"kl_reduction": "sum"}, "kl_reduction"),
        ({"noise": False}, "pruning needs noise"), ({"finetune": "frozen"}, "finetune must be"),
        ({"kl_weight": 0.0}, "kl_weight must be"),
        ({"epochs": 3, "prune_every": 5}, "never prune"), ({"epochs": 0, "finetune_epochs": 2}, "never prune"),
        ({"criterion": "l2", "amount": 0.5, "amount_schedule": [3]}, "not both"),
        ({"criterion": "none", "amount": 0.5}, "criterion 'none' never prunes"),
        ({"criterion": "bmrs-u", "low": -5.0}, "precision interval"),
        ({"dataset": "foo"}, "unknown dataset 'foo'"),
        ({"noise_lr_scale": 0.0}, "noise_lr_scale must be"), ({"evidence_margin": -1.0}, "evidence margin"),
        ({"kl_reduction": "layer"}, "kl_reduction must be one of"),
    ]:
        with pytest.raises(bmrs.ConfigError, match=fragment):
            TrainConfig(**kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("criterion,p1", [("bmrs-u", 4.0), ("bmrs-n", 8.0)])
def test_mlp_on_real_fashion_mnist_prunes_and_compacts_exactly(fmnist_slice, tmp_path, criterion, p1):
    cfg = TrainConfig(model="mlp", hidden=64, criterion=criterion, p1=p1, epochs=7, finetune_epochs=1,
                      batch_size=16, lr=1e-2, train_subset=3000, seed=1)
    metrics = train(cfg, tmp_path / "run", progress=False, log=quiet, data=fmnist_slice)
    assert metrics["test_accuracy"] > 0.6  # chance is 0.1
    assert metrics["compacted_test_accuracy"] == metrics["test_accuracy"]
    if criterion == "bmrs-u":
        # Posteriors that the data leaves prior-like put their mass on low-precision θ: pruned.
        assert metrics["structures_pruned_pct"] > 30
        assert 0 < metrics["parameter_compression_pct"] < 100 and metrics["flops_removed_pct"] > 0
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("test_accuracy", "test_top5_accuracy", "val_accuracy", "structures_pruned_pct",
                "parameter_compression_pct", "flops_removed_pct", "epoch_seconds", "config"):
        assert key in saved
    assert saved["config"]["criterion"] == criterion
    assert (tmp_path / "run" / "model_masked.safetensors").exists()
    assert (tmp_path / "run" / "model_compact.safetensors").exists()
    assert (tmp_path / "run" / "history.png").stat().st_size > 0
    assert len(saved["history"]) == 8
    # the masks that were set are exactly the criterion's decisions on the final posteriors
    from bmrs.training.artifacts import load_run
    run = load_run(tmp_path / "run")
    masks = {name: noise.mask == 0 for name, noise in bmrs.noise_layers(run.model)}
    assert sum(int(m.sum()) for m in masks.values()) == saved["structures_pruned"]


def test_deterministic_finetuning_freezes_the_noise_and_drops_the_kl(fmnist_slice, tmp_path):
    cfg = TrainConfig(model="mlp", hidden=32, criterion="bmrs-u", p1=4, epochs=2, finetune_epochs=2,
                      batch_size=64, lr=1e-2, train_subset=3000, seed=3, finetune="deterministic")
    seen = []

    def snapshot(message):
        if message.startswith("epoch"):
            model = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
            seen.append({k: v.clone() for k, v in model.items() if k.endswith((".mu", ".log_sigma"))})

    metrics = train(cfg, tmp_path / "run", progress=False, log=snapshot, data=fmnist_slice)
    kls = [h["train_kl"] for h in metrics["history"]]
    assert kls[0] > 0 and kls[1] > 0 and kls[2] == 0 and kls[3] == 0
    # the posteriors stop moving once the pruning epochs are over; the weights keep training
    for key in seen[1]:
        assert torch.equal(seen[1][key], seen[3][key]) and not torch.equal(seen[0][key], seen[1][key])
    assert metrics["history"][3]["train_ce"] != metrics["history"][2]["train_ce"]
    assert metrics["compacted_test_accuracy"] == metrics["test_accuracy"]


def _killed_in_epoch(epoch: int, cfg, output, data, monkeypatch) -> None:
    """Run ``cfg`` until a KeyboardInterrupt inside epoch ``epoch``, as a killed process would stop."""
    calls = {"n": 0}
    real_epoch = run_module.train_epoch

    def dying_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == epoch:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(run_module, "train_epoch", dying_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, output, progress=False, log=quiet, data=data)
    monkeypatch.setattr(run_module, "train_epoch", real_epoch)


def test_resume_after_interruption_gives_identical_metrics(fmnist_slice, tmp_path, monkeypatch):
    cfg = TrainConfig(model="mlp", hidden=32, criterion="snr", epochs=2, finetune_epochs=1, batch_size=128,
                      lr=5e-3, train_subset=3000, seed=2)
    straight = train(cfg, tmp_path / "straight", progress=False, log=quiet, data=fmnist_slice)

    _killed_in_epoch(2, cfg, tmp_path / "killed", fmnist_slice, monkeypatch)  # after the first checkpoint
    with pytest.raises(bmrs.ConfigError, match="--resume"):
        train(cfg, tmp_path / "killed", progress=False, log=quiet, data=fmnist_slice)
    resumed = train(cfg, tmp_path / "killed", resume=True, progress=False, log=quiet, data=fmnist_slice)
    for key in ("test_accuracy", "val_accuracy", "structures_pruned_pct", "parameter_compression_pct"):
        assert resumed[key] == straight[key], key
    assert [h["val_accuracy"] for h in resumed["history"]] == [h["val_accuracy"] for h in straight["history"]]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "lenet5"])
def test_shrinking_during_training_matches_masking_and_resumes(fmnist_slice, tmp_path, monkeypatch, model):
    # (E[θ] ranks by the posteriors alone; L2 would differ: weights reading removed inputs drop out of its norms)
    cfg = TrainConfig(model=model, hidden=48, criterion="ev", amount_schedule=[20, 40, 60], epochs=3,
                      finetune_epochs=1, batch_size=64, lr=2e-3, train_subset=3000, seed=4)
    masked = train(cfg, tmp_path / "masked", progress=False, log=quiet, data=fmnist_slice)
    assert masked["structures_pruned"] == 60
    shrunk_cfg = TrainConfig(**{**cfg.to_dict(), "shrink": True})

    _killed_in_epoch(3, shrunk_cfg, tmp_path / "shrunk", fmnist_slice, monkeypatch)  # holds a shrunk network
    shrunk = train(shrunk_cfg, tmp_path / "shrunk", resume=True, progress=False, log=quiet, data=fmnist_slice)
    # the same θ stream, KL weights and Adam moments: the same run up to floating-point summation order,
    # whose differences (1e-7 at first, see test_shrink) SGD slowly amplifies
    assert [h["structures_pruned"] for h in shrunk["history"]] == [h["structures_pruned"] for h in masked["history"]]
    for got, want in zip(shrunk["history"], masked["history"]):
        assert got["val_accuracy"] == pytest.approx(want["val_accuracy"], abs=1e-2)
        assert got["train_ce"] == pytest.approx(want["train_ce"], rel=1e-2)
    for key in ("params_before", "params_after", "flops_before", "flops_after", "structures"):
        assert shrunk[key] == masked[key], key
    assert shrunk["test_accuracy"] == pytest.approx(masked["test_accuracy"], abs=1e-2)
    from bmrs.training.artifacts import load_run
    run = load_run(tmp_path / "shrunk")
    assert bmrs.pruning.structure_counts(run.model).pruned == shrunk["structures_pruned"]
    # bmrs compact and bmrs curve measure against the network as built, as bmrs train did, not the shrunk one
    from bmrs.experiments.compact_run import compact_run
    from bmrs.experiments.curve import sweep
    report = compact_run(tmp_path / "shrunk", batch_size=4, log=quiet)
    assert (report["params_before"], report["params_after"]) == (shrunk["params_before"], shrunk["params_after"])
    first = sweep(run.model, fmnist_slice, "ev", 2, baseline=run.built_model(), progress=False)["points"][0]
    assert first["structures_pruned"] == shrunk["structures_pruned"]
    assert first["compression"] == pytest.approx(shrunk["parameter_compression_pct"])


def test_resume_removes_files_half_written_by_a_killed_process(fmnist_slice, tmp_path):
    cfg = TrainConfig(model="mlp", hidden=16, criterion="none", epochs=1, finetune_epochs=0, batch_size=256,
                      train_subset=3000)
    train(cfg, tmp_path / "r", progress=False, log=quiet, data=fmnist_slice)
    stale = tmp_path / "r" / ".checkpoint.pt.k1ll3d.bmrs-tmp"  # what SIGKILL inside atomic_write leaves
    stale.write_bytes(b"half a checkpoint")
    foreign = tmp_path / "r" / ".notes.swp.tmp"  # another program's temporary: not bmrs's to remove
    foreign.write_text("mine")
    train(cfg, tmp_path / "r", resume=True, progress=False, log=quiet, data=fmnist_slice)
    assert not stale.exists() and (tmp_path / "r" / "metrics.json").exists() and foreign.read_text() == "mine"


def test_resume_with_other_settings_is_refused(fmnist_slice, tmp_path):
    cfg = TrainConfig(model="mlp", hidden=16, criterion="none", epochs=1, finetune_epochs=0, batch_size=256,
                      train_subset=3000)
    train(cfg, tmp_path / "r", progress=False, log=quiet, data=fmnist_slice)
    other = TrainConfig(model="mlp", hidden=16, criterion="none", epochs=1, finetune_epochs=0, batch_size=128,
                        train_subset=3000)
    with pytest.raises(bmrs.CheckpointError, match="batch_size"):
        train(other, tmp_path / "r", resume=True, progress=False, log=quiet, data=fmnist_slice)


def test_damaged_run_files_give_checkpoint_errors(fmnist_slice, tmp_path):
    from bmrs.io import read_json, save_checkpoint
    from bmrs.training.artifacts import load_run
    cfg = TrainConfig(model="mlp", hidden=16, criterion="none", epochs=1, finetune_epochs=0, batch_size=256,
                      train_subset=3000)
    train(cfg, tmp_path / "r", progress=False, log=quiet, data=fmnist_slice)
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    for key, damaged in [("best_val_accuracy", None), ("history", None), ("config", "x"), ("epoch", 1.5)]:
        save_checkpoint(tmp_path / "r" / "checkpoint.pt", {**state, key: damaged})
        with pytest.raises(bmrs.CheckpointError, match=repr(key)):
            train(cfg, tmp_path / "r", resume=True, progress=False, log=quiet, data=fmnist_slice)
    metrics = read_json(tmp_path / "r" / "metrics.json")
    for damaged in ["null", json.dumps({**metrics, "data": {}}), json.dumps({**metrics, "config": [1]})]:
        (tmp_path / "r" / "metrics.json").write_text(damaged)
        with pytest.raises(bmrs.CheckpointError, match="not written by bmrs train"):
            load_run(tmp_path / "r")
    (tmp_path / "r" / "metrics.json").write_bytes(b"\x9c\xff\x00 not text")
    with pytest.raises(bmrs.CheckpointError, match="UTF-8"):
        load_run(tmp_path / "r")


def test_nan_loss_stops_with_the_layer_named(fmnist_slice, tmp_path):
    cfg = TrainConfig(model="mlp", hidden=16, criterion="bmrs-n", epochs=1, finetune_epochs=0, batch_size=256,
                      train_subset=3000)
    model = run_module.build_for(cfg, 1, 10)
    with torch.no_grad():
        name, noise = bmrs.noise_layers(model)[0]
        noise.mu[3] = float("nan")
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(bmrs.errors.TrainingError, match=rf"{name}\.bmrs_noise\.mu \(1 of 16"):
        run_module.train_epoch(model, opt, fmnist_slice.train, batch_size=256, generator=torch.Generator(),
                               progress=False)


@pytest.mark.parametrize("args,fragment", [
    (["train", "--p1", "30"], "p1 must be"),
    (["train", "--epochs", "-2"], "epochs must be"),
    (["train", "--batch-size", "0"], "batch_size must be"),
    (["train", "--model", "alexnet"], "unknown model"),
    (["train", "--dataset", "imagenet21k", "--output", "{tmp}/x"], "unknown dataset"),
    (["compact", "--run", "{tmp}/x", "--batch-size", "-5"], "--batch-size"),
    (["compact", "--run", "{tmp}/x", "--batch-size", "0"], "--batch-size"),
    # the paper's reproduction left the installed package (its own --levels check: test_reproduce.py)
    (["reproduce", "fashion-mnist", "--levels", "1", "--runs", "{tmp}/r", "--report", "{tmp}/p"],
     "python -m paper fashion-mnist"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, fragment, tmp_path, run_cli):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = run_cli(*args)
    assert result.returncode in (1, 2), result.stderr
    lines = [l for l in result.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and fragment.lower() in lines[0].lower(), result.stderr
    assert "Traceback" not in result.stderr


def test_cli_usage_errors_exit_2(run_cli):
    result = run_cli("train", "--criterion", "magic")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    assert run_cli("--help").returncode == 0


@pytest.mark.slow
def test_cli_compact_and_curve_on_a_finished_run(tmp_path, run_cli):
    run = tmp_path / "run"
    made = run_cli("--no-progress", "train", "--model", "mlp", "--hidden", "16", "--criterion", "bmrs-u", "--p1", "4",
                   "--epochs", "2", "--finetune-epochs", "0", "--batch-size", "16", "--lr", "1e-2",
                   "--train-subset", "800", "--threads", "1", "--output", str(run))
    assert made.returncode == 0, made.stderr
    compacted = run_cli("compact", "--run", str(run), "--batch-size", "8", "--export", "pt2")
    assert compacted.returncode == 0, compacted.stderr
    report = json.loads((run / "compact_report.json").read_text())
    assert report["params_after"] <= report["params_before"] and report["latency_speedup_b8"] > 0
    assert report["export_pt2"]["relative_error"] <= 1e-5 and (run / "model_compact.pt2").stat().st_size > 0
    from bmrs.saving import read_description
    plain_file = read_description(run / "model_compact.safetensors")
    optimized = run_cli("compact", "--run", str(run), "--batch-size", "8", "--optimize")  # latency with fast layers
    assert optimized.returncode == 0 and "fast inference layers" in optimized.stdout, optimized.stderr
    assert not report["optimized"] and json.loads((run / "compact_report.json").read_text())["optimized"]
    # the file holds plain layers either way (compared by content: safetensors keeps the metadata in a hash map,
    # so the order of its keys in the header differs between processes)
    optimized_file = read_description(run / "model_compact.safetensors")
    assert optimized_file[0] == plain_file[0] and optimized_file[1].keys() == plain_file[1].keys()
    assert all(torch.equal(optimized_file[1][k], plain_file[1][k]) for k in plain_file[1])
    from bmrs.training.artifacts import load_run
    small = load_run(run).compacted()  # the file bmrs compact wrote, rebuilt without pickle
    assert sum(p.numel() for p in small.parameters()) == report["params_after"]
    refused = run_cli("compact", "--run", str(run), "--output", str(run / "checkpoint.pt"))
    assert refused.returncode == 2 and "one of the run's own files" in refused.stderr
    curve = run_cli("--no-progress", "curve", "--run", str(run), "--levels", "3", "--criteria", "bmrs-n,l2")
    assert curve.returncode == 0, curve.stderr
    result = json.loads((run / "curve" / "curve.json").read_text())
    assert [r["criterion"] for r in result["results"]] == ["bmrs-n", "l2"]
    assert len(result["results"][1]["points"]) == 3 and "stop" in result["results"][0]
    assert (run / "curve" / "curve.png").stat().st_size > 0 and (run / "curve" / "curve.csv").exists()
    # bad values are refused before any sweep runs (a nan p1 failed after the bmrs-n sweep, leaving half a curve)
    before = (run / "curve" / "curve.json").read_bytes()
    for bad in (["--p1", "nan", "--output", str(run / "curve")], ["--output", str(run / "metrics.json")]):
        refused = run_cli("--no-progress", "curve", "--run", str(run), "--levels", "3", "--criteria", "bmrs-n,bmrs-u", *bad)
        assert refused.returncode == 2 and refused.stderr.startswith("bmrs: error:"), refused.stderr
    assert (run / "curve" / "curve.json").read_bytes() == before


def test_runs_made_before_a_setting_existed_read_as_what_they_did():
    """A config without the newer keys is the old behaviour (exact rule, noise at the network's rate,
    the paper's KL, noisy fine-tuning), not today's defaults: such runs resume and count as the paper's."""
    old = {k: v for k, v in TrainConfig().to_dict().items()
           if k not in ("evidence_margin", "noise_lr_scale", "kl_reduction", "kl_weight", "finetune")}
    paper = TrainConfig(evidence_margin=0.0, noise_lr_scale=1.0, kl_reduction="mean", kl_weight=1.0, finetune="noisy")
    assert comparable_settings(old) == comparable_settings(paper.to_dict())
    assert comparable_settings(old) != comparable_settings(TrainConfig().to_dict())


def test_compare_to_a_reference_run(tmp_path, fmnist_slice):
    cfg = TrainConfig(model="mlp", hidden=16, criterion="none", noise=False, epochs=0, finetune_epochs=1,
                      batch_size=256, train_subset=3000)
    train(cfg, tmp_path / "plain", progress=False, log=quiet, data=fmnist_slice)
    from bmrs.training.compare import baseline_metrics, comparison_line
    line = comparison_line({"test_accuracy": 0.5, "parameter_compression_pct": 90.0},
                           baseline_metrics(tmp_path / "plain"), "plain")
    assert line.startswith("compared with plain: test accuracy 0.5000 vs ") and "90.0% of parameters removed" in line
    with pytest.raises(bmrs.ConfigError, match="no finished run"):
        baseline_metrics(tmp_path / "nothing")
