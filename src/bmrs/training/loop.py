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
from ..nn.bank import shard_rows
from ..nn.frozen import frozen_noise

__all__ = ["batches", "train_epoch", "evaluate", "check_finite", "divergence_bound", "DIVERGENCE_FACTOR"]

#: training stops when a batch's cross-entropy exceeds this many times the untrained network's (at least ln C)
DIVERGENCE_FACTOR = 1000.0


def batches(dataset: TensorDataset, batch_size: int, generator: torch.Generator | None = None,
            device: torch.device | str = "cpu", min_batch: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches of an in-memory dataset, shuffled by ``generator`` (in order when None).

    A last batch smaller than ``min_batch`` joins the one before it (BatchNorm cannot train on one example).

    Examples:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.zeros(5, 1), torch.zeros(5))
        >>> [len(y) for _, y in batches(data, 2)], [len(y) for _, y in batches(data, 2, min_batch=2)]
        ([2, 2, 1], [2, 3])
    """
    x, y = dataset.tensors
    n = len(y)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < min_batch:
        starts.pop()
    for i, start in enumerate(starts):
        idx = order[start:starts[i + 1] if i + 1 < len(starts) else n]
        yield x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)


@torch.no_grad()
def divergence_bound(model: nn.Module, dataset: TensorDataset, device="cpu", examples: int = 64) -> float:
    """The cross-entropy above which training has diverged: ``DIVERGENCE_FACTOR`` × the untrained network's
    cross-entropy on the first ``examples`` training examples (deterministic, eval mode), and at least
    ``DIVERGENCE_FACTOR`` × ln C (what a network that predicts uniformly over C classes scores).

    A cross-entropy of 1000 ln 10 ≈ 2300 needs logit gaps of thousands on the average example: converging runs
    stay near or below ln C, so they are never flagged, while an exploding one passes it within a few steps.

    Examples:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from bmrs.models import mlp
        >>> data = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
        >>> divergence_bound(mlp(in_dim=64, hidden=16), data) >= 1000 * math.log(10)
        True
    """
    was_training = model.training
    model.eval()
    try:
        x, y = dataset.tensors
        logits = model(x[:examples].to(device))
        initial = float(nn.functional.cross_entropy(logits.float(), y[:examples].to(device)))
    finally:
        model.train(was_training)
    if not math.isfinite(initial):
        raise TrainingError(f"the untrained network's loss is {initial}: check the input data (non-finite values?)")
    return DIVERGENCE_FACTOR * max(initial, math.log(logits.shape[1]))


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
                forward: nn.Module | None = None, freeze_noise: bool = False,
                diverge_above: float | None = None) -> dict[str, float]:
    """One pass of cross-entropy + KL (when the model has noise layers) with Adam-style updates.

    ``kl_weight`` multiplies the KL term (a tempered posterior between the ELBO and the paper's weighting).
    ``freeze_noise``: the noise layers act deterministically (θ = E[θ]·mask, as in evaluation) and
    the KL term is dropped, so only the network's own weights train (deterministic fine-tuning).

    With ``dist`` (a DistContext) each process trains on its slice of every global batch through
    ``forward`` (the DDP wrapper of ``model``); the cross-entropy is scaled so that the averaged
    gradient is that of the global-batch mean.  Statistics are this process's.

    ``diverge_above`` (see :func:`divergence_bound`): a batch whose cross-entropy exceeds it stops training with a
    TrainingError.  A network with BatchNorm never trains on a last batch of one example (it joins the one before).

    Examples:
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
    num_train = len(dataset)
    totals = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "correct": 0, "seen": 0}
    steps = math.ceil(num_train / batch_size)
    batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if batch_norm and num_train == 1:
        raise TrainingError("BatchNorm cannot train on a single example: use at least 2 training examples")
    bar = tqdm(batches(dataset, batch_size, generator, device, min_batch=2 if batch_norm else 1), total=steps, desc=desc, leave=False,
               disable=not progress, unit="batch")
    for step, (x, y) in enumerate(bar):
        scale, first = 1.0, 0
        if dist is not None and dist.active:
            part = dist.local_slice(len(y))
            scale, first = dist.world * (part.stop - part.start) / len(y), part.start
            x, y = x[part], y[part]
        with shard_rows(model, first):
            logits = forward(x)
        # (a process whose slice of a short last batch is empty still joins the gradient average)
        ce = nn.functional.cross_entropy(logits, y) if len(y) else logits.sum() * 0.0
        kl = kl_weight * kl_loss(model, kl_reduction, num_train) if has_noise else torch.zeros((), device=ce.device)
        loss = ce * scale + kl
        check_finite(model, loss, f"{desc}, batch {step + 1}")
        ce_value = ce.item()
        if diverge_above is not None and ce_value > diverge_above:
            raise TrainingError(f"training diverged at {desc}, batch {step + 1}: the cross-entropy is {ce_value:.3g}, "
                                f"above {diverge_above:.3g} ({DIVERGENCE_FACTOR:g} x the untrained network's); lower "
                                "--lr (or --noise-lr-scale)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = len(y)
        totals["loss"] += (ce_value + kl.item()) * n
        totals["ce"] += ce_value * n
        totals["kl"] += kl.item() * n
        totals["correct"] += int((logits.argmax(1) == y).sum())
        totals["seen"] += n
    seen = max(totals["seen"], 1)
    return {"loss": totals["loss"] / seen, "ce": totals["ce"] / seen, "kl": totals["kl"] / seen,
            "accuracy": totals["correct"] / seen}


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, batch_size: int = 1024, device="cpu") -> dict[str, float]:
    """Top-1 and top-5 accuracy (fractions) in eval mode (E[θ]·mask in place of the noise).

    Examples:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from bmrs.models import mlp
        >>> data = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
        >>> sorted(evaluate(mlp(in_dim=64, hidden=16), data))
        ['accuracy', 'top5_accuracy']
    """
    model.eval()
    correct1 = correct5 = seen = 0
    with frozen_noise(model):
        for x, y in batches(dataset, batch_size, None, device):
            logits = model(x)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += int((top[:, 0] == y).sum())
            correct5 += int((top == y[:, None]).any(1).sum())
            seen += len(y)
    seen = max(seen, 1)
    return {"accuracy": correct1 / seen, "top5_accuracy": correct5 / seen}
