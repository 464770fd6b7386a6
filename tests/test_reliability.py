"""Reliability: corrupt checkpoints, unwritable outputs, SIGKILL at several points, safe loading."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bmrs
from bmrs.io import check_writable, load_checkpoint

SRC = Path(__file__).resolve().parent.parent / "src" / "bmrs"
SMALL = ["--no-progress", "train", "--model", "mlp", "--hidden", "16", "--epochs", "2", "--finetune-epochs", "1",
         "--batch-size", "256", "--train-subset", "2000", "--threads", "1"]


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "bmrs", *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(result, code: int, fragment: str) -> None:
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("bmrs: error:"), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    result = cli(*SMALL, "--criterion", "bmrs-u", "--output", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_every_torch_load_is_weights_only():
    for path in SRC.rglob("*.py"):
        for match in re.finditer(r"torch\.load\(([^)]*)\)", path.read_text()):
            assert "weights_only=True" in match.group(1), f"{path}: {match.group(0)}"


@pytest.mark.slow
def test_truncated_checkpoint_is_a_clear_error(finished_run, tmp_path, run_cli):
    ckpt = finished_run / "checkpoint.pt"
    broken = tmp_path / "r"
    broken.mkdir()
    (broken / "checkpoint.pt").write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 3])
    one_line_error(run_cli(*SMALL, "--criterion", "bmrs-u", "--output", str(broken), "--resume"), 1, "truncated")
    with pytest.raises(bmrs.CheckpointError):
        load_checkpoint(broken / "checkpoint.pt")


@pytest.mark.slow
def test_checkpoint_of_another_model_is_a_clear_error(finished_run, tmp_path, run_cli):
    state = load_checkpoint(finished_run / "checkpoint.pt")
    state["model"] = {k.replace("1.", "9.", 1): v for k, v in state["model"].items()}  # foreign layout
    folder = tmp_path / "r"
    folder.mkdir()
    torch.save(state, folder / "checkpoint.pt")
    one_line_error(run_cli(*SMALL, "--criterion", "bmrs-u", "--output", str(folder), "--resume"), 1, "another model")


@pytest.mark.slow
def test_resume_with_other_settings_names_them(finished_run, run_cli):
    result = run_cli(*SMALL, "--criterion", "bmrs-u", "--lr", "0.5", "--output", str(finished_run), "--resume")
    one_line_error(result, 1, "lr")


def test_unwritable_output_fails_before_training(tmp_path, run_cli):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    start = time.perf_counter()
    one_line_error(run_cli(*SMALL, "--output", str(blocker / "run")), 2, "cannot write to output folder")
    assert time.perf_counter() - start < 60


def test_full_disk_is_detected_before_training(tmp_path, monkeypatch):
    class Full:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(os, "statvfs", lambda _: Full())
    with pytest.raises(bmrs.ConfigError, match="MiB free"):
        check_writable(tmp_path / "out")


@pytest.mark.parametrize("args,code,fragment", [
    pytest.param(["train", "--p1", "23"], 2, "p1 must be", id="process-p1"),  # (a real process: its exit status)
    (["train", "--p1", "0"], 2, "p1 must be"),
    (["train", "--low", "0", "--high", "-1"], 2, "low < 0 <= high"),
    (["train", "--epochs", "-1"], 2, "epochs must be"),
    (["train", "--batch-size", "0"], 2, "batch_size must be"),
    (["train", "--model", "alexnet"], 2, "unknown model"),
    (["train", "--criterion", "l2"], 2, "--amount"),
    (["train", "--dataset", "mnist", "--data-dir", "{empty}", "--output", "{tmp}/o"], 1, "mnist"),
    (["compact", "--run", "{tmp}/nothing"], 1, "not a finished bmrs run"),
    (["curve", "--run", "{tmp}/nothing"], 1, "not a finished bmrs run"),
    (["train", "--seed", str(2**64)], 2, "seed must be"),
    pytest.param(["train", "--model", "mlp", "--hidden", "65536", "--image-size", "4096", "--train-subset", "100",
                  "--epochs", "1", "--finetune-epochs", "0", "--output", "{tmp}/o"], 1, "out of memory",
                 id="process-out-of-memory"),
])
def test_cli_bad_input(args, code, fragment, tmp_path, request, run_cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.replace("{tmp}", str(tmp_path)).replace("{empty}", str(empty)) for a in args]
    if "process" in request.node.callspec.id:  # two in a real interpreter, the others in this one
        env_free = {k: v for k, v in os.environ.items() if k != "BMRS_DATA_DIR"}
        result = subprocess.run([sys.executable, "-m", "bmrs", *args], capture_output=True, text=True, timeout=300,
                                env=env_free)
    else:
        result = run_cli(*args)
    one_line_error(result, code, fragment)


def test_debug_shows_the_traceback():
    result = cli("--debug", "train", "--p1", "30")
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.slow
def test_compact_of_a_run_without_noise_is_a_clear_error(tmp_path, run_cli):
    out = tmp_path / "plain"
    assert run_cli(*SMALL, "--criterion", "none", "--no-noise", "--output", str(out)).returncode == 0
    one_line_error(run_cli("compact", "--run", str(out)), 1, "no noise layers")


KILLED = [*SMALL, "--criterion", "bmrs-u", "--p1", "4", "--epochs", "3", "--seed", "5"]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """The run every SIGKILLed one must resume to, run once."""
    reference = tmp_path_factory.mktemp("uninterrupted") / "reference"
    assert cli(*KILLED, "--output", str(reference)).returncode == 0
    return reference


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_checkpoints,extra_delay", [(1, 0.0), (1, 0.4), (2, 0.1), (3, 0.0)])
def test_sigkill_at_several_points_resumes_to_identical_metrics(tmp_path, uninterrupted_run, kill_after_checkpoints,
                                                                extra_delay):
    common, reference = KILLED, uninterrupted_run
    victim = tmp_path / "victim"
    proc = subprocess.Popen([sys.executable, "-m", "bmrs", *common, "--output", str(victim)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, seen, last = victim / "checkpoint.pt", 0, None
    deadline = time.time() + 300
    while seen < kill_after_checkpoints and proc.poll() is None and time.time() < deadline:
        if ckpt.exists() and ckpt.stat().st_mtime_ns != last:
            last, seen = ckpt.stat().st_mtime_ns, seen + 1
        time.sleep(0.01)
    time.sleep(extra_delay)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    result = cli(*common, "--output", str(victim), "--resume")
    assert result.returncode == 0, result.stderr
    a = json.loads((reference / "metrics.json").read_text())
    b = json.loads((victim / "metrics.json").read_text())
    for key in ("test_accuracy", "val_accuracy", "structures_pruned_pct", "parameter_compression_pct"):
        assert a[key] == b[key], key
    assert [h["val_accuracy"] for h in a["history"]] == [h["val_accuracy"] for h in b["history"]]
    leftovers = [p.name for p in victim.iterdir() if ".bmrs-tmp" in p.name]
    assert not leftovers


def test_fused_adam_steps_invalidate_the_eval_cache():
    # fused Adam writes parameters without bumping their version counters; the cached E[θ]·mask compares
    # values, else it would stay stale and an uninterrupted run would differ from a resumed one
    from bmrs.training.optim import make_optimizer

    torch.manual_seed(0)
    net = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)))
    noise = bmrs.noise_layers(net)[0][1]
    optimizer = make_optimizer(net.parameters(), lr=0.1)
    assert optimizer.defaults["fused"]  # CPU float parameters: the fused kernel
    net.eval()
    noise.expected_theta()
    net.train()
    net(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    net.eval()
    cached = noise.expected_theta().clone()
    with torch.no_grad():
        assert torch.equal(cached, noise.posterior().mean * noise.mask)


def test_optimizer_falls_back_where_no_fused_kernel_exists():
    from bmrs.training.optim import fused_supported, make_optimizer

    assert not fused_supported([torch.nn.Parameter(torch.ones(2, device="meta"))])
    assert make_optimizer([torch.nn.Parameter(torch.ones(2, device="meta"))], lr=0.1).defaults["fused"] is None


def test_compacting_a_diverged_model_names_the_broken_tensor():
    model = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)))
    with torch.no_grad():
        model[2].bias[1] = float("nan")
    with pytest.raises(bmrs.errors.ModelError, match="2.bias holds NaN"):
        bmrs.compact(model, torch.randn(2, 3))


def test_writing_under_a_file_is_a_clear_error(tmp_path):
    from bmrs.io import atomic_write
    (tmp_path / "afile").write_text("x")
    with pytest.raises(bmrs.ConfigError, match="is a file, not a folder"):
        atomic_write(tmp_path / "afile" / "sub" / "out.json", lambda tmp: None)
    (tmp_path / "afolder").mkdir()
    with pytest.raises(bmrs.ConfigError, match="afolder: it is a folder"):
        atomic_write(tmp_path / "afolder", lambda tmp: None)
    assert list((tmp_path / "afolder").iterdir()) == []


@pytest.mark.slow
def test_resume_refuses_adam_moments_of_the_wrong_shape(finished_run, tmp_path):
    # load_state_dict checks only how many parameters there are; the fused step then wrote past the end of
    # the smaller moments (glibc aborted: "corrupted double-linked list")
    state = load_checkpoint(finished_run / "checkpoint.pt")
    for entry in state["optimizer"]["state"].values():
        entry["exp_avg"], entry["exp_avg_sq"] = entry["exp_avg"].flatten()[:1], entry["exp_avg_sq"].flatten()[:1]
    folder = tmp_path / "r"
    folder.mkdir()
    torch.save(state, folder / "checkpoint.pt")
    one_line_error(cli(*SMALL, "--criterion", "bmrs-u", "--output", str(folder), "--resume"), 1, "does not fit")


@pytest.mark.slow
def test_a_finished_run_without_its_checkpoint_is_not_overwritten(finished_run, tmp_path, run_cli):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "metrics.json").write_bytes((finished_run / "metrics.json").read_bytes())
    one_line_error(run_cli(*SMALL, "--criterion", "bmrs-u", "--output", str(folder)), 2, "finished run")
    assert (folder / "metrics.json").read_bytes() == (finished_run / "metrics.json").read_bytes()


def test_resume_takes_the_runs_thread_count(monkeypatch):
    from bmrs.training.resume import resume_threads
    notes = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: notes.append(("set", n)))
    resume_threads(1, None, notes.append)
    resume_threads(1, 2, notes.append)
    resume_threads(None, None, notes.append)  # a checkpoint from before the count was kept
    assert notes[0] == ("set", 1) and len(notes) == 2 and "resuming on 2 threads where the run used 1" in notes[1]


def test_atomic_writes_take_the_umask_and_leave_nothing_else(tmp_path):
    from bmrs.io import _UMASK, save_state_dict, write_json
    write_json(tmp_path / "m.json", {"a": 1})
    save_state_dict(tmp_path / "m.safetensors", {"w": torch.ones(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]
    for name in ("m.json", "m.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~_UMASK


@pytest.mark.slow
@pytest.mark.parametrize("damage, fragment", [
    (lambda s: s.update(epoch=-5), "outside the run's"),
    (lambda s: s.update(history=[1] * s["epoch"]), "history does not hold"),
    (lambda s: s.update(best_state={"x": torch.ones(1)}), "best state does not fit"),
    (lambda s: s.update(best_state=None), "kept no best state"),
])
def test_resume_refuses_a_damaged_record_of_progress(finished_run, tmp_path, damage, fragment, run_cli):
    # each gave a traceback (RuntimeError, TypeError) after training, or (epoch -5) retrained silently
    state = load_checkpoint(finished_run / "checkpoint.pt")
    damage(state)
    folder = tmp_path / "r"
    folder.mkdir()
    torch.save(state, folder / "checkpoint.pt")
    one_line_error(run_cli(*SMALL, "--criterion", "bmrs-u", "--output", str(folder), "--resume"), 1, fragment)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_checkpoint_holding_code_is_refused_with_a_whole_message(tmp_path):
    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    (tmp_path / "garbled.pt").write_bytes(b"garbage")
    with pytest.raises(bmrs.CheckpointError, match="a safe \\(weights-only\\) load refuses to run; it was not written by bmrs$"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(bmrs.CheckpointError, match="its pickle is garbled"):
        load_checkpoint(tmp_path / "garbled.pt")
