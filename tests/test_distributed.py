"""Two processes (torchrun, gloo on CPU) compute what one process computes with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import bmrs
from bmrs.nn.bank import shard_rows

ARGS = ["--no-progress", "train", "--model", "mlp", "--hidden", "32", "--criterion", "l2", "--amount", "0.5",
        "--epochs", "2", "--finetune-epochs", "1", "--batch-size", "64", "--lr", "3e-3", "--train-subset", "640",
        "--threads", "1", "--seed", "11"]


@pytest.mark.slow
def test_two_ranks_agree_with_each_other_and_with_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "bmrs", *ARGS, "--output", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600, env=env)
    # every epoch ends with an exact all-gather comparison of parameters and masks across the ranks:
    # a disagreement would have stopped the run with a TrainingError
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "bmrs", *ARGS, "--output", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]

    a = load_file(str(tmp_path / "two" / "model_masked.safetensors"))
    b = load_file(str(tmp_path / "one" / "model_masked.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("mask"):
            assert torch.equal(a[key], b[key]), key
            assert 0 < int((a[key] == 0).sum()) < a[key].numel()
        else:  # equal up to the order of floating-point sums
            assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
    ma = json.loads((tmp_path / "two" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert ma["structures_pruned"] == mb["structures_pruned"]
    assert abs(ma["test_accuracy"] - mb["test_accuracy"]) <= 0.002


@pytest.mark.parametrize("granularity", ["structure", "element"])
def test_a_shard_draws_the_theta_one_process_draws_for_its_examples(granularity):
    # the bank's row_first (a shard's first global example) counts the uniform stream's rows for every
    # granularity: per element the rows are (example, position) pairs, offset by whole examples
    torch.manual_seed(0)
    model = bmrs.attach(torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                                            torch.nn.Linear(3 * 4 * 4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)),
                        granularity=granularity)
    for _, noise in bmrs.noise_layers(model):
        with torch.no_grad():
            noise.mu.fill_(-3.0)
            noise.log_sigma.fill_(0.0)  # wide: θ visibly random
    seen = []
    for _, noise in bmrs.noise_layers(model):
        noise.register_forward_hook(lambda m, inp, out: seen.append(out.detach() / inp[0].detach()))
    x = torch.randn(5, 2, 6, 6)
    model.train()
    torch.manual_seed(1)
    model(x)
    full, seen[:] = list(seen), []
    torch.manual_seed(1)  # every rank holds the same generator state
    with shard_rows(model, 2):
        model(x[2:4])
    for whole, shard in zip(full, seen):
        torch.testing.assert_close(shard, whole[2:4])
    assert model._bmrs_bank.row_first == 0
    assert all(n._held is None for _, n in bmrs.noise_layers(model))  # nothing left with the layers after
