"""One epoch of training, evaluation, and the numerical guard against NaN losses."""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from ..errors import TrainingError
from ..nn.attach import kl_loss, noise_layers

__all__ = ["batches", "train_epoch", "evaluate", "check_finite"]


def batches(dataset: TensorDataset, batch_size: int, generator: torch.Generator | None = None,
            device: torch.device | str = "cpu") -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches of an in-memory dataset, shuffled by ``generator`` (in order when None)."""
    x, y = dataset.tensors
    n = len(y)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        yield x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)


def check_finite(model: nn.Module, loss: Tensor, where: str) -> None:
    """Raise TrainingError naming the noise layer / parameter holding NaN or inf, if the loss is not finite."""
    if torch.isfinite(loss).all():
        return
    culprits = []
    for name, noise in noise_layers(model):
        for pname in ("mu", "log_sigma"):
            value = getattr(noise, pname)
            bad = ~torch.isfinite(value)
            if bad.any():
                culprits.append(f"{name}.bmrs_noise.{pname} ({int(bad.sum())} of {value.numel()} non-finite)")
        kl = noise.kl().detach()
        if not torch.isfinite(kl).all():
            culprits.append(f"{name}.bmrs_noise KL ({int((~torch.isfinite(kl)).sum())} non-finite)")
    for pname, param in model.named_parameters():
        if "bmrs_noise" not in pname and not torch.isfinite(param).all():
            culprits.append(f"{pname} ({int((~torch.isfinite(param)).sum())} non-finite)")
    detail = "; ".join(culprits[:5]) if culprits else "all parameters are finite: the data or the logits overflowed"
    raise TrainingError(f"loss became {loss.item()} at {where}: {detail}; lower --lr or check the input data")


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, dataset: TensorDataset, *,
                batch_size: int, generator: torch.Generator, kl_reduction: str = "mean", kl_weight: float = 1.0,
                device="cpu", progress: bool = True, desc: str = "train", dist=None,
                forward: nn.Module | None = None, freeze_noise: bool = False) -> dict[str, float]:
    """One pass of cross-entropy + KL (when the model has noise layers) with Adam-style updates.

    ``kl_weight`` multiplies the KL term (a tempered posterior between the ELBO and the paper's weighting).
    ``freeze_noise``: the noise layers act deterministically (θ = E[θ]·mask, as in evaluation) and
    the KL term is dropped, so only the network's own weights train (deterministic fine-tuning).

    With ``dist`` (a DistContext) each process trains on its slice of every global batch through
    ``forward`` (the DDP wrapper of ``model``); the cross-entropy is scaled so that the averaged
    gradient is that of the global-batch mean.  Statistics are this process's.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from bmrs.models import mlp
        >>> model = mlp(in_dim=64, hidden=16)
        >>> data = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
        >>> stats = train_epoch(model, torch.optim.Adam(model.parameters()), data, batch_size=16,
        ...                     generator=torch.Generator().manual_seed(0), progress=False)
        >>> sorted(stats)
        ['accuracy', 'ce', 'kl', 'loss']
    """
    model.train()
    forward = forward or model
    layers = noise_layers(model)
    if freeze_noise:
        for _, noise in layers:
            noise.eval()
    has_noise = bool(layers) and not freeze_noise
    bank = getattr(model, "_bmrs_bank", None)
    num_train = len(dataset)
    totals = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "correct": 0, "seen": 0}
    steps = math.ceil(num_train / batch_size)
    bar = tqdm(batches(dataset, batch_size, generator, device), total=steps, desc=desc, leave=False,
               disable=not progress, unit="batch")
    for step, (x, y) in enumerate(bar):
        scale = 1.0
        if dist is not None and dist.active:
            part = dist.local_slice(len(y))
            scale = dist.world * (part.stop - part.start) / len(y)
            if bank is not None:
                bank.row_first = part.start
            x, y = x[part], y[part]
        try:
            logits = forward(x)
        finally:
            if bank is not None:
                bank.row_first = 0
        # (a process whose slice of a short last batch is empty still joins the gradient average)
        ce = nn.functional.cross_entropy(logits, y) if len(y) else logits.sum() * 0.0
        kl = kl_weight * kl_loss(model, kl_reduction, num_train) if has_noise else torch.zeros((), device=ce.device)
        loss = ce * scale + kl
        check_finite(model, loss, f"{desc}, batch {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = len(y)
        totals["loss"] += (ce.item() + kl.item()) * n
        totals["ce"] += ce.item() * n
        totals["kl"] += kl.item() * n
        totals["correct"] += int((logits.argmax(1) == y).sum())
        totals["seen"] += n
    seen = max(totals["seen"], 1)
    return {"loss": totals["loss"] / seen, "ce": totals["ce"] / seen, "kl": totals["kl"] / seen,
            "accuracy": totals["correct"] / seen}


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, batch_size: int = 1024, device="cpu") -> dict[str, float]:
    """Top-1 and top-5 accuracy (fractions) in eval mode (E[θ]·mask in place of the noise).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from bmrs.models import mlp
        >>> data = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
        >>> sorted(evaluate(mlp(in_dim=64, hidden=16), data))
        ['accuracy', 'top5_accuracy']
    """
    model.eval()
    correct1 = correct5 = seen = 0
    for x, y in batches(dataset, batch_size, None, device):
        logits = model(x)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(1).sum())
        seen += len(y)
    seen = max(seen, 1)
    return {"accuracy": correct1 / seen, "top5_accuracy": correct5 / seen}
