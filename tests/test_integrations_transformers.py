"""bmrs.integrations.transformers with the real Hugging Face Trainer on a slice of real Fashion-MNIST."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bmrs
from bmrs.data import load_dataset
from bmrs.errors import ConfigError

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from bmrs.integrations.transformers import BMRSCallback, BMRSTrainer  # noqa: E402


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist", train_subset=2000, progress=False)


class Classifier(nn.Module):
    """A model as Trainer calls it: keyword inputs, a dict with the loss when labels are given."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                                 nn.Linear(128, 10))

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        if labels is None:
            return {"logits": logits}
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Images(torch.utils.data.Dataset):
    def __init__(self, dataset, n=None):
        self.x, self.y = (t[:n] for t in dataset.tensors)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def _args(tmp_path, epochs, **extra):
    return transformers.TrainingArguments(
        str(tmp_path), num_train_epochs=epochs, per_device_train_batch_size=32, learning_rate=2e-3,
        lr_scheduler_type="constant", weight_decay=0.01, report_to="none", save_strategy="no", use_cpu=True,
        disable_tqdm=True, seed=0, **extra)


@pytest.mark.slow
def test_the_trainer_prunes_fine_tunes_and_compacts_a_real_model(fashion, tmp_path):
    torch.manual_seed(0)
    model = Classifier()
    callback = BMRSCallback(finetune_epochs=1)
    trainer = BMRSTrainer(model=model, args=_args(tmp_path, 3), train_dataset=Images(fashion.train),
                          callbacks=[callback])
    trainer.train()
    noise_group = trainer.optimizer.param_groups[-1]  # bmrs.param_groups' rate for 63 steps an epoch, no decay
    assert noise_group["weight_decay"] == 0.0 and noise_group["lr"] == pytest.approx(0.1)
    assert {id(p) for p in noise_group["params"]} == {id(p) for p in callback.plan.noise_parameters(model)}
    assert len(callback.reports) == 2  # two pruning epochs, then one of fine-tuning
    report = callback.reports[-1]
    assert report.pruned > 0.3 * report.structures, [r.pruned for r in callback.reports]
    logged = [entry for entry in trainer.state.log_history if "bmrs/structures_pruned" in entry]
    assert [entry["bmrs/structures_pruned"] for entry in logged] == [r.pruned for r in callback.reports]
    x, y = fashion.test.tensors
    with torch.no_grad():
        masked = model.eval()(x)["logits"]
        small = callback.compacted(x)["logits"]
    assert float((masked.argmax(1) == y).float().mean()) > 0.7  # chance is 0.1
    assert torch.allclose(small, masked, atol=1e-4)
    assert sum(p.numel() for p in callback.compacted.parameters()) < 0.7 * sum(p.numel() for p in model.parameters())
    assert not bmrs.noise_layers(callback.compacted)


def test_the_kl_term_enters_the_loss_once_per_accumulated_batch(fashion, tmp_path):
    torch.manual_seed(0)
    model = Classifier()
    trainer = BMRSTrainer(model=model, args=_args(tmp_path, 1, gradient_accumulation_steps=2),
                          train_dataset=Images(fashion.train, 64))
    inputs = {"pixel_values": fashion.train.tensors[0][:32], "labels": fashion.train.tensors[1][:32]}
    model.train()
    kl = trainer.bmrs.plan.kl(model).item()
    assert kl > 0
    # this model's loss is a batch mean: Trainer divides the whole loss by the 2 accumulation steps itself
    loss, outputs = trainer.compute_loss(model, dict(inputs), return_outputs=True)
    assert (loss - outputs["loss"]).item() == pytest.approx(kl, rel=1e-5)
    # a loss already normalised over the accumulated batch: the KL term is divided here
    trainer.loss_is_scaled_for_ga, trainer.current_gradient_accumulation_steps = True, 2
    loss, outputs = trainer.compute_loss(model, dict(inputs), return_outputs=True)
    assert (loss - outputs["loss"]).item() == pytest.approx(kl / 2, rel=1e-5)
    model.eval()  # evaluation losses carry no KL term
    loss, outputs = trainer.compute_loss(model, dict(inputs), return_outputs=True)
    assert loss.item() == outputs["loss"].item()


def test_a_plain_trainer_with_the_callback_stops_at_the_first_step(fashion, tmp_path):
    trainer = transformers.Trainer(model=Classifier(), args=_args(tmp_path, 1),
                                   train_dataset=Images(fashion.train, 64), callbacks=[BMRSCallback()])
    with pytest.raises(ConfigError, match="BMRSTrainer"):
        trainer.train()


def test_bad_settings_are_refused(fashion, tmp_path):
    with pytest.raises(ConfigError, match="finetune"):
        BMRSCallback(finetune="sometimes")
    trainer = BMRSTrainer(model=Classifier(), args=_args(tmp_path, 1), train_dataset=Images(fashion.train, 64),
                          callbacks=[BMRSCallback(finetune_epochs=1)])
    with pytest.raises(ConfigError, match="leaves no epoch"):
        trainer.train()
