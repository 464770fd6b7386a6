"""``bmrs prune``: a user's own model factory and checkpoint, trained on a slice of real Fashion-MNIST."""

from __future__ import annotations

import textwrap
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import bmrs
from bmrs.cli import main
from bmrs.data import load_dataset

NETS = textwrap.dedent("""
    from torch import nn

    def mlp(width=64):
        return nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                             nn.Linear(width, 10))

    def wide():
        return mlp(96)

    def broken():
        raise RuntimeError("no weights here")

    not_a_model = 3
""")


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist", train_subset=2000, progress=False)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A folder holding the user's module ``usernets`` and the current folder of the command."""
    (tmp_path / "usernets.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _mlp(width=64):
    return nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


def _train(model, data, epochs, kl=True):
    optimizer = torch.optim.Adam(bmrs.param_groups(model, lr=2e-3, steps_per_prune=63) if kl else model.parameters(),
                                 lr=2e-3)
    x, y = data.tensors
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(y), generator=generator).split(32):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch]) + (bmrs.kl_loss(model, "structure-mean") * 0.3
                                                                               if kl else 0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def noisy_state(fashion):
    torch.manual_seed(0)
    return _train(bmrs.attach(_mlp()), fashion.train, epochs=2).state_dict()


@pytest.fixture(scope="module")
def plain_state(fashion):
    torch.manual_seed(0)
    return _train(_mlp(), fashion.train, epochs=1, kl=False).state_dict()


def _run(capsys, *argv):
    code = main(["prune", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_prunes_a_trained_noisy_checkpoint_and_writes_a_loadable_small_model(folder, fashion, noisy_state, capsys):
    save_file(noisy_state, str(folder / "trained.safetensors"))
    code, out, err = _run(capsys, "--model", "usernets:mlp", "--checkpoint", "trained.safetensors",
                          "--input-shape", "1,32,32", "--criterion", "bmrs-n")
    assert code == 0, err
    assert "compacted model: trained-pruned.safetensors" in out
    small = bmrs.load(folder / "trained-pruned.safetensors", _mlp)
    reference = bmrs.attach(_mlp())  # the same pruning in Python
    reference.load_state_dict(noisy_state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bmrs.pruning.PruningWarning)
        report = bmrs.prune(reference, bmrs.criteria.BMRSN())
    assert report.pruned > 0 and f"pruned {report.pruned} of {report.structures}" in out
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in _mlp().parameters())
    x, y = fashion.test.tensors
    with torch.no_grad():
        expected, got = reference.eval()(x), small(x)
    assert torch.allclose(got, expected, atol=1e-4)
    assert float((got.argmax(1) == y).float().mean()) > 0.6  # chance is 0.1


@pytest.mark.slow
def test_a_plain_checkpoint_is_pruned_by_weight_magnitude_only(folder, fashion, plain_state, capsys):
    torch.save(plain_state, folder / "plain.pt")
    code, _, err = _run(capsys, "--model", "usernets:mlp", "--checkpoint", "plain.pt", "--input-shape", "1,32,32")
    assert code == 2 and "l2 --amount" in err  # BMRS needs trained posteriors
    code, out, err = _run(capsys, "--model", "usernets:mlp", "--checkpoint", "plain.pt", "--input-shape", "1,32,32",
                          "--criterion", "l2", "--amount", "0", "--output", "same.safetensors")
    assert code == 0, err
    plain = _mlp()
    plain.load_state_dict(plain_state)
    x = fashion.test.tensors[0][:256]
    with torch.no_grad():  # nothing pruned: the network's function is kept exactly (θ = 1)
        assert torch.equal(bmrs.load("same.safetensors", _mlp)(x), plain.eval()(x))
    code, out, err = _run(capsys, "--model", "usernets:mlp", "--checkpoint", "plain.pt", "--input-shape", "1,32,32",
                          "--criterion", "l2", "--amount", "0.5")
    assert code == 0, err
    small = bmrs.load("plain-pruned.safetensors", _mlp)
    assert small[1].out_features + small[3].out_features == 64  # half of the 128 structures


def _lightning_checkpoint(folder, noisy_state):
    """A checkpoint written by a real Lightning Trainer whose LightningModule holds the user's model as ``self.net``
    (and a loss module with a buffer of its own); SGD at lr 0, so the weights are ``noisy_state``'s."""
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = bmrs.attach(_mlp())
            self.net.load_state_dict(noisy_state)
            self.loss = nn.CrossEntropyLoss(weight=torch.ones(10))

        def training_step(self, batch, batch_idx):
            return self.loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    data = torch.utils.data.TensorDataset(torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,)))
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=str(folder))
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(folder / "last.ckpt")
    return folder / "last.ckpt"


def test_a_lightning_checkpoint_with_its_key_prefix_is_pruned_as_the_bare_state_dict(folder, noisy_state, capsys):
    checkpoint = _lightning_checkpoint(folder, noisy_state)
    assert "net.0.weight" not in torch.load(checkpoint, weights_only=True)["state_dict"]  # (net.1: after Flatten)
    save_file(noisy_state, str(folder / "bare.safetensors"))
    common = ["--model", "usernets:mlp", "--input-shape", "1,32,32", "--criterion", "bmrs-n"]
    code, _, err = _run(capsys, *common, "--checkpoint", "bare.safetensors")
    assert code == 0, err
    code, out, err = _run(capsys, *common, "--checkpoint", "last.ckpt", "--key-prefix", "net.")
    assert code == 0, err
    want, got = bmrs.load("bare-pruned.safetensors", _mlp), bmrs.load("last-pruned.safetensors", _mlp)
    assert [t.shape for t in got.state_dict().values()] == [t.shape for t in want.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))
    # without the prefix: one line naming keys on both sides, and the prefix to pass
    code, _, err = _run(capsys, *common, "--checkpoint", "last.ckpt", "--output", "none.safetensors")
    assert code == 1 and err.startswith("bmrs: error: ") and err.count("\n") == 1, err
    assert "missing '1.bias'" in err and "unexpected " in err and "'loss.weight'" in err
    assert "pass --key-prefix net." in err and not (folder / "none.safetensors").exists()


@pytest.mark.parametrize("prefix, message", [
    ("model.", "--key-prefix 'model.': no key of "),               # no key starts with it
    ("net", "usernets:mlp builds (missing '1.bias'"),  # '.1.bias' left
    ("net", "unexpected '.1.bias'"),
    ("net", "pass --key-prefix net."),
    ("net.1.", "pass the factory that built the trained model, or --key-prefix"),
])
def test_a_wrong_key_prefix_is_one_line_naming_keys(folder, noisy_state, capsys, prefix, message):
    wrapped = {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.6.0",  # as Lightning lays it out
               "state_dict": {f"net.{key}": value for key, value in noisy_state.items()}, "optimizer_states": [],
               "lr_schedulers": [], "callbacks": {}, "loops": {}}
    torch.save(wrapped, folder / "wrapped.ckpt")
    code, _, err = _run(capsys, "--model", "usernets:mlp", "--input-shape", "1,32,32", "--checkpoint", "wrapped.ckpt",
                        "--key-prefix", prefix, "--criterion", "l2", "--amount", "0.5")
    assert code == 1 and err.startswith("bmrs: error: ") and err.count("\n") == 1 and message in err, err
    assert not (folder / "wrapped-pruned.safetensors").exists()


@pytest.mark.parametrize("argv, code, message", [
    (["--model", "usernets"], 2, "expected MODULE:FACTORY"),
    (["--model", "no_such_module_here:mlp"], 2, "cannot import no_such_module_here"),
    (["--model", "usernets:missing"], 2, "usernets has no 'missing'"),
    (["--model", "usernets:not_a_model"], 2, "not a function or class"),
    (["--model", "usernets:broken"], 1, "building the model failed (RuntimeError: no weights here)"),
    (["--model", "usernets:wide"], 1, "does not fit the model that usernets:wide builds"),
    (["--model", "usernets:mlp", "--input-shape", "1,0,32"], 2, "--input-shape"),
    (["--model", "usernets:mlp", "--output", "trained.safetensors"], 2, "is the checkpoint itself"),
    (["--model", "usernets:mlp", "--checkpoint", "missing.safetensors"], 1, "no such checkpoint file"),
    (["--model", "usernets:mlp", "--checkpoint", "garbage.pt"], 1, "garbage.pt: cannot read"),
    (["--model", "usernets:mlp", "--criterion", "bmrs-u", "--p1", "40"], 2, "p1"),
    (["--model", "usernets:mlp", "--criterion", "l2", "--amount", "1e20"], 2, "--amount"),
    (["--model", "usernets:mlp", "--criterion", "bmrs-u", "--p1", "-3"], 2, "--p1"),
])
def test_bad_input_gives_one_line_and_an_exit_code(folder, noisy_state, capsys, argv, code, message):
    save_file(noisy_state, str(folder / "trained.safetensors"))
    (folder / "garbage.pt").write_bytes(b"not a checkpoint at all")
    defaults = {"--checkpoint": "trained.safetensors", "--input-shape": "1,32,32"}
    for option, value in defaults.items():
        if option not in argv:
            argv = [*argv, option, value]
    got, out, err = _run(capsys, *argv)
    assert got == code, err
    assert err.startswith("bmrs: error: ") and err.count("\n") == 1 and message in err, err
    assert not (folder / "trained-pruned.safetensors").exists()
