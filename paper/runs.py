"""The paper's Fashion-MNIST grid: every method × network × seed as resumable ``bmrs train`` runs.

Runs are separate processes (one thread each, ``workers`` at a time, two by default for two
cores).  A finished run (its metrics.json exists) is skipped and a killed one resumes, so the grid
can be continued across days.  L2 prunes, at every epoch, as many structures as the paper's BMRS_N
(the public code's ΔF, ``bmrs-n-published``) did in the run with the same network and seed, as in
the paper; it waits for that run.

Examples:
    jobs = grid_jobs("runs/reproduce", seeds=[0, 1, 2])
    run_jobs(jobs, workers=2)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from bmrs import CheckpointError, ConfigError
from bmrs.io import read_json
from bmrs.training import TrainConfig
from bmrs.training.config import comparable_settings
from bmrs.training.options import train_argv

__all__ = ["NETWORKS", "METHODS", "EXTRA_METHODS", "GOAL_REFERENCES", "Job", "grid_jobs", "run_jobs", "PAPER", "PAPER_STD"]

# Each network, recipe and method is a set of TrainConfig settings; a job's config is them together, later ones
# winning (network, recipe, method, schedule, the grid's extra settings, then the seed and one thread).
NETWORKS = {
    "mlp": {"model": "mlp", "hidden": 150, "layers": 1, "batch_size": 128, "lr": 1.5e-3},
    "lenet5": {"model": "lenet5", "batch_size": 32, "lr": 1.4e-3},
}
# The paper's training recipe (its KL weight, noisy fine-tuning, noise parameters at the network's rate, the
# exact ΔF >= 0); every method but ``bmrs-n`` runs with it.  ``bmrs-n`` is ``bmrs train``'s defaults.
PAPER_RECIPE = {"kl_reduction": "mean", "kl_weight": 1.0, "finetune": "noisy", "noise_lr_scale": 1.0,
                "evidence_margin": 0.0}
METHODS = {
    "none": {"criterion": "none"},
    "l2": {"criterion": "l2"},
    "ev": {"criterion": "ev"},
    "snr": {"criterion": "snr"},
    "bmrs-n": {"criterion": "bmrs-n"},
    "bmrs-u-8": {"criterion": "bmrs-u", "p1": 8.0},
    "bmrs-u-4": {"criterion": "bmrs-u", "p1": 4.0},
    "plain": {"criterion": "none", "noise": False},  # no noise layers: the training-time baseline
    # beyond the paper: bmrs train's defaults (stated rule, noise rate, KL weight, deterministic fine-tuning);
    # the exact rule with the paper's recipe; what explains the paper's BMRS_N numbers; the ELBO weighting
    "bmrs-n-exact": {"criterion": "bmrs-n"},
    "bmrs-n-published": {"criterion": "bmrs-n-published"},
    "bmrs-n-elbo": {"criterion": "bmrs-n", "kl_reduction": "elbo"},
    # towards the goal (BMRS_N ≥ 85% compression within 2 points): fine-tune the pruned network with
    # θ fixed at E[θ] and no KL, with the KL weighted as 100 × the evidence lower bound's (between the ELBO and
    # the paper's layer mean, which weighs a structure's KL 160-2000 times the ELBO's here), with the
    # paper's weighting and with the ELBO itself
    "bmrs-n-published-elbo100-detft": {"criterion": "bmrs-n-published", "kl_reduction": "elbo", "kl_weight": 100.0,
                                       "finetune": "deterministic"},
    "bmrs-n-published-detft": {"criterion": "bmrs-n-published", "finetune": "deterministic"},
    "bmrs-n-published-elbo-detft": {"criterion": "bmrs-n-published", "kl_reduction": "elbo",
                                    "finetune": "deterministic"},
}
EXTRA_METHODS = ("bmrs-n-exact", "bmrs-n-published", "bmrs-n-elbo", "bmrs-n-published-elbo100-detft", "bmrs-n-published-detft",
                 "bmrs-n-published-elbo-detft")
# the unpruned references the goal is measured against
GOAL_REFERENCES = ("none", "plain")
# The paper's L2 prunes as many structures as its BMRS_N did, and its BMRS_N is the public code's
# (with +½ ln 2π): exact BMRS_N prunes nothing here, so L2 follows the published variant.
L2_MATCHES = "bmrs-n-published"
# The paper's Table (Fashion-MNIST, continuous pruning): (compression %, accuracy %).
PAPER = {
    ("mlp", "none"): (0.00, 88.17), ("mlp", "l2"): (87.86, 18.23), ("mlp", "ev"): (91.76, 85.59),
    ("mlp", "snr"): (99.83, 10.00), ("mlp", "bmrs-n"): (93.20, 84.99), ("mlp", "bmrs-u-8"): (93.02, 85.01),
    ("mlp", "bmrs-u-4"): (91.57, 85.79),
    ("lenet5", "none"): (0.00, 89.16), ("lenet5", "l2"): (83.62, 10.00), ("lenet5", "ev"): (89.71, 50.93),
    ("lenet5", "snr"): (98.47, 17.01), ("lenet5", "bmrs-n"): (88.02, 77.90), ("lenet5", "bmrs-u-8"): (87.61, 77.23),
    ("lenet5", "bmrs-u-4"): (88.72, 81.10),
}


# the paper's BMRS_N numbers came from its public code, whose rule bmrs-n-published reproduces
PAPER.update({(net, "bmrs-n-published"): PAPER[(net, "bmrs-n")] for net in ("mlp", "lenet5")})


# The paper's standard deviations over ten seeds: (compression, accuracy).
PAPER_STD = {
    ("mlp", "none"): (0.0, 0.20), ("mlp", "l2"): (2.27, 10.22), ("mlp", "ev"): (0.81, 0.26),
    ("mlp", "snr"): (0.00, 0.00), ("mlp", "bmrs-n"): (0.66, 0.35), ("mlp", "bmrs-u-8"): (0.81, 0.32),
    ("mlp", "bmrs-u-4"): (0.71, 0.34),
    ("lenet5", "none"): (0.0, 0.27), ("lenet5", "l2"): (1.69, 0.00), ("lenet5", "ev"): (0.56, 33.45),
    ("lenet5", "snr"): (3.45, 21.03), ("lenet5", "bmrs-n"): (1.00, 2.44), ("lenet5", "bmrs-u-8"): (0.72, 3.49),
    ("lenet5", "bmrs-u-4"): (0.73, 1.50),
}


@dataclass
class Job:
    """One run of the grid: its TrainConfig's settings (keyword arguments) and its folder.  A job that follows
    another run (``depends_on``: L2 after BMRS_N) gets its ``amount_schedule`` from that run once it has finished.

    Examples:
        >>> job = Job("mlp", "none", 0, Path("runs/mlp/none/seed0"), {"model": "mlp", "criterion": "none"})
        >>> job.train_config().criterion, job.command()[5:]
        ('none', ['--model', 'mlp', '--criterion', 'none', '--output', 'runs/mlp/none/seed0', '--resume'])
    """

    network: str
    method: str
    seed: int
    folder: Path
    settings: dict = field(default_factory=dict)
    depends_on: Path | None = None

    @property
    def done(self) -> bool:
        """Finished, with this job's settings (a finished run with other settings is ``stale``)."""
        return self.finished and not self.changed_settings()

    @property
    def finished(self) -> bool:
        return (self.folder / "metrics.json").exists()

    def changed_settings(self) -> list[str]:
        """The settings in which the finished run in ``folder`` differs from this job's (empty: none, or
        not finished yet).  An L2 job whose BMRS_N run is not finished cannot be compared: it differs."""
        if not self.finished:
            return []
        if self.depends_on is not None and not (self.depends_on / "metrics.json").exists():
            return ["amount_schedule"]
        wanted = comparable_settings(self.train_config().to_dict())
        saved = _metrics(self.folder).get("config")
        have = comparable_settings(saved if isinstance(saved, dict) else {})
        return sorted(k for k in wanted if have.get(k) != wanted[k])

    def train_config(self) -> TrainConfig:
        """This job's TrainConfig (ConfigError if its settings are bad; CheckpointError if the run it follows
        has no usable history)."""
        settings = dict(self.settings)
        if self.depends_on is not None:  # L2 matches BMRS_N's structure count at every pruning step
            settings["amount_schedule"] = _structure_counts(self.depends_on)
        return TrainConfig(**settings)

    def command(self) -> list[str]:
        """The ``bmrs train`` command that runs (or resumes) this job in ``folder``."""
        return [sys.executable, "-m", "bmrs", "--no-progress", "train", *train_argv(self.train_config()),
                "--output", str(self.folder), "--resume"]


def _structure_counts(folder: Path) -> list[int]:
    """The structures pruned at each pruning step of the finished run in ``folder``."""
    history = _metrics(folder).get("history")
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise CheckpointError(f"{folder / 'metrics.json'}: no epoch history to match; delete the run and rerun")
    counts = [h.get("structures_pruned") for h in history if "pruned" in h]
    bad = next((i for i, c in enumerate(counts) if isinstance(c, bool) or not isinstance(c, int) or c < 0), None)
    if bad is not None:
        raise CheckpointError(f"{folder / 'metrics.json'}: field history[…].structures_pruned of pruning step "
                              f"{bad + 1} must be a count >= 0, got {counts[bad]!r}; the file is damaged: delete "
                              "the run and rerun")
    return counts


def _metrics(folder: Path) -> dict:
    """A finished run's metrics.json, which must hold a JSON object."""
    metrics = read_json(folder / "metrics.json")
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{folder / 'metrics.json'}: not a bmrs metrics file (holds a JSON "
                              f"{type(metrics).__name__}); delete it and rerun")
    return metrics


def grid_jobs(root: str | Path, seeds: list[int], networks=None, methods=None, epochs: int = 50,
              finetune_epochs: int = 10, extra: dict | None = None) -> list[Job]:
    """Every (network, method, seed) job; BMRS_N jobs first so that L2 can follow them.  ``extra``: TrainConfig
    settings of every job (e.g. ``{"train_subset": 300}``)."""
    root = Path(root)
    networks = networks or list(NETWORKS)
    methods = methods or list(METHODS)
    # L2 follows the run whose structure counts it matches; the extra methods come after the table's
    order = sorted(methods, key=lambda m: (m == "l2", m in EXTRA_METHODS and m != L2_MATCHES, m != "bmrs-n",
                                           m != L2_MATCHES))
    jobs = []
    for seed in seeds:
        for network in sorted(networks, key=lambda n: n != "mlp"):  # the fast network first
            for method in order:
                folder = root / network / method / f"seed{seed}"
                recipe = {} if method == "bmrs-n" else PAPER_RECIPE
                settings = {**NETWORKS[network], **recipe, **METHODS[method], "epochs": epochs,
                            "finetune_epochs": finetune_epochs, **(extra or {}), "seed": seed, "threads": 1}
                dep = root / network / L2_MATCHES / f"seed{seed}" if method == "l2" else None
                jobs.append(Job(network, method, seed, folder, settings, dep))
    return jobs


def run_jobs(jobs: list[Job], workers: int = 2, log=print, poll: float = 1.0, progress: bool = True) -> list[Job]:
    """Run unfinished jobs, ``workers`` at a time; returns the jobs that failed.  Refuses (ConfigError)
    when a job's folder holds a finished run made with other settings, before starting any."""
    changed = [j.changed_settings() for j in jobs]  # (each reads the run's metrics)
    pending = [j for j, c in zip(jobs, changed) if not j.finished or c]  # the jobs not done
    to_run = {j.folder for j in pending}
    # (an L2 job whose BMRS_N run is still to run has no schedule to compare yet)
    stale = [(j, c) for j, c in zip(jobs, changed) if c and j.depends_on not in to_run]
    if stale:
        job, settings = stale[0]
        raise ConfigError(f"{job.folder} holds a finished run with other settings ({', '.join(settings)}); "
                          f"{len(stale)} such run(s) in all: delete them or pass another --runs folder")
    running: list[tuple[Job, subprocess.Popen, object]] = []
    failed: list[Job] = []
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(pending), desc="runs", unit="run", disable=not progress)
    try:
        _run_pending(pending, running, failed, bar, workers, log, poll)
    finally:  # Ctrl-C, SIGTERM or an error here: no run goes on writing behind our back
        stop_children(running)
        bar.close()
    return failed


def stop_children(running: list) -> None:
    """Stop the ``bmrs train`` children still running (SIGTERM: each ends its epoch's writes cleanly and keeps its
    last checkpoint, so the next ``python -m paper`` resumes it); kill those that do not stop within 30 s."""
    for _, proc, _ in running:
        if proc.poll() is None:
            proc.terminate()
    for _, proc, logf in running:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logf.close()
    running.clear()


def _run_pending(pending: list[Job], running: list, failed: list[Job], bar, workers: int, log, poll: float) -> None:
    while pending or running:
        for job, proc, logf in list(running):
            if proc.poll() is not None:
                logf.close()
                running.remove((job, proc, logf))
                bar.update(1)
                if proc.returncode != 0:
                    failed.append(job)
                    log(f"failed: {job.network} {job.method} seed {job.seed} (see {job.folder / 'train.log'})")
        ready = [j for j in pending if j.depends_on is None or (j.depends_on / "metrics.json").exists()]
        blocked_forever = [j for j in pending if j.depends_on is not None and any(
            f.folder == j.depends_on for f in failed)]
        for job in blocked_forever:
            pending.remove(job)
            failed.append(job)
        while ready and len(running) < workers:
            job = ready.pop(0)
            pending.remove(job)
            job.folder.mkdir(parents=True, exist_ok=True)
            logf = open(job.folder / "train.log", "a")
            proc = subprocess.Popen(job.command(), stdout=logf, stderr=subprocess.STDOUT)
            running.append((job, proc, logf))
        if not ready and not running and pending:
            break  # waiting on dependencies that will not come
        time.sleep(poll)


def summary_rows(jobs: list[Job]) -> list[dict]:
    """Per-job metrics of the finished jobs (for tables)."""
    rows = []
    for job in jobs:
        if job.done:
            m = json.loads((job.folder / "metrics.json").read_text())
            rows.append({"network": job.network, "method": job.method, "seed": job.seed,
                         "compression": m["parameter_compression_pct"], "accuracy": 100 * m["test_accuracy"],
                         "structures_pruned_pct": m["structures_pruned_pct"], "epoch_seconds": m["epoch_seconds"]})
    return rows
