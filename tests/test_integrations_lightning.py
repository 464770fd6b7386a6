"""bmrs.integrations.lightning.BMRSPruning with the real PyTorch Lightning on a slice of real Fashion-MNIST."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bmrs
from bmrs.data import load_dataset
from bmrs.errors import ConfigError

pl = pytest.importorskip("lightning.pytorch")
from bmrs.integrations.lightning import BMRSPruning, kl_term, param_groups  # noqa: E402


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist", train_subset=2000, progress=False)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


class Classifier(pl.LightningModule):
    def __init__(self, with_kl: bool = True, bmrs_groups: bool = True):
        super().__init__()
        self.net = _mlp()
        self.with_kl, self.bmrs_groups = with_kl, bmrs_groups

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        return loss + kl_term(self) if self.with_kl else loss

    def configure_optimizers(self):
        params = param_groups(self, lr=2e-3) if self.bmrs_groups else self.parameters()
        return torch.optim.Adam(params, lr=2e-3)


def _trainer(callback, epochs: int) -> "pl.Trainer":
    return pl.Trainer(max_epochs=epochs, callbacks=[callback], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)


def _loader(dataset, shuffle=True):
    return torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=shuffle,
                                       generator=torch.Generator().manual_seed(0))


def _accuracy(model, dataset) -> float:
    x, y = dataset.tensors
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


@pytest.mark.slow
def test_the_callback_prunes_fine_tunes_and_compacts_a_real_model(fashion):
    torch.manual_seed(0)
    module = Classifier()
    callback = BMRSPruning(module="net", finetune_epochs=1)
    trainer = _trainer(callback, epochs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on data loader workers
        trainer.fit(module, _loader(fashion.train))
    assert len(callback.reports) == 2  # two pruning epochs, then one of fine-tuning
    pruned = callback.reports[-1].pruned
    assert pruned > 0.3 * callback.reports[-1].structures, [r.pruned for r in callback.reports]
    assert trainer.callback_metrics["bmrs/structures_pruned"].item() == pruned  # logged through Lightning
    masked = module.net.eval()
    accuracy = _accuracy(masked, fashion.test)
    assert accuracy > 0.7  # chance is 0.1
    small = callback.compacted
    assert sum(p.numel() for p in small.parameters()) < 0.7 * sum(p.numel() for p in masked.parameters())
    x = fashion.test.tensors[0][:512]
    with torch.no_grad():
        assert torch.allclose(small(x), masked(x), atol=1e-4)
    assert not bmrs.noise_layers(small)


def test_deterministic_fine_tuning_leaves_the_noise_parameters_alone(fashion):
    torch.manual_seed(0)
    module = Classifier()
    small_data = torch.utils.data.TensorDataset(*[t[:320] for t in fashion.train.tensors])
    callback = BMRSPruning(module="net", finetune_epochs=1, compact=False)
    seen = {}

    class Snapshot(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen[trainer.current_epoch] = [p.detach().clone() for p in callback.plan.noise_parameters(pl_module.net)]

    trainer = pl.Trainer(max_epochs=2, callbacks=[callback, Snapshot()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, _loader(small_data))
    after = callback.plan.noise_parameters(module.net)
    assert not all(torch.equal(a, b) for a, b in zip(seen[0], seen[1]))  # trained in the pruning epoch
    assert all(torch.equal(a, b) for a, b in zip(seen[1], after))  # fixed while fine-tuning
    assert callback.compacted is None


def test_a_loss_without_the_kl_term_stops_at_the_first_step(fashion):
    small_data = torch.utils.data.TensorDataset(*[t[:64] for t in fashion.train.tensors])
    with pytest.raises(ConfigError, match="no KL term.*kl_term"):
        _trainer(BMRSPruning(module="net"), epochs=1).fit(Classifier(with_kl=False), _loader(small_data))


def test_an_optimizer_without_the_noise_groups_is_refused(fashion):
    small_data = torch.utils.data.TensorDataset(*[t[:64] for t in fashion.train.tensors])
    with pytest.raises(ConfigError, match="share a learning rate.*param_groups"):
        _trainer(BMRSPruning(module="net"), epochs=1).fit(Classifier(bmrs_groups=False), _loader(small_data))


def test_bad_settings_are_refused_before_training():
    with pytest.raises(ConfigError, match="module="):
        BMRSPruning(shrink=True)
    with pytest.raises(ConfigError, match="finetune_epochs"):
        BMRSPruning(finetune_epochs=-1)
    with pytest.raises(ConfigError, match="no submodule"):
        BMRSPruning(module="body").network(Classifier())
    with pytest.raises(ConfigError, match="leaves no epoch"):
        _trainer(BMRSPruning(module="net", finetune_epochs=2), epochs=2).fit(
            Classifier(), _loader(torch.utils.data.TensorDataset(torch.randn(8, 1, 32, 32), torch.zeros(8).long())))


def test_shrink_removes_pruned_structures_while_training(fashion):
    torch.manual_seed(0)
    module = Classifier()
    callback = BMRSPruning(module="net", shrink=True, amount=0.5, criterion="snr")
    trainer = _trainer(callback, epochs=2)
    data = torch.utils.data.TensorDataset(*[t[:640] for t in fashion.train.tensors])
    trainer.fit(module, _loader(data))
    kept = callback.reports[-1].kept
    assert module.net[1].out_features + module.net[3].out_features == kept < 256  # what pruning left
    assert trainer.optimizers[0].param_groups[0]["params"][0] is module.net[1].weight  # the new optimizer
    x = fashion.test.tensors[0][:256]
    with torch.no_grad():
        assert torch.allclose(callback.compacted(x), module.net.eval()(x), atol=1e-4)
