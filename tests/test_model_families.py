"""The model-family tester: every family of ``families.FAMILIES`` (the built-in models and the example
networks) trains with noise attached, has a finite KL, prunes, compacts exactly, shrinks to an equivalent
network, saves and loads, and exports to ONNX.

A new model family is added to ``tests/families.py`` and is then checked by every test here.
"""

from __future__ import annotations

import copy

import pytest
import torch

import bmrs
from bmrs.compaction import count, shrink
from bmrs.compaction.count import count_params
from bmrs.models import MODEL_NAMES
from families import BUILTIN, FAMILIES, make, rel_err

REL = 1e-5
SLOW = {"builtin_resnet50"}  # (25M parameters: seconds per check)
FAMILY_PARAMS = [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in FAMILIES]
# the training step on the fused kernels and on the reference path (the ResNets: on the session's own setting)
KERNEL_PARAMS = [pytest.param(f, on, id=f"{f}-kernels-{'on' if on else 'off'}")
                 for f in FAMILIES if not f.startswith("builtin_resnet") for on in (True, False)]
KERNEL_PARAMS += [pytest.param(f, None, id=f, marks=[pytest.mark.slow] if f in SLOW else [])
                  for f in FAMILIES if f.startswith("builtin_resnet")]


def _unmasked(model: torch.nn.Module) -> torch.nn.Module:
    for _, noise in bmrs.noise_layers(model):
        noise.mask.fill_(1.0)
    return model


def _masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: noise.mask.clone() for name, noise in bmrs.noise_layers(model)}


def test_every_builtin_model_is_a_family():
    assert {builder["name"] for builder in BUILTIN.values()} == set(MODEL_NAMES)


@pytest.mark.parametrize("family, on", KERNEL_PARAMS)
def test_train_step_with_noise_attached(family, on, kernels):
    if on is None:
        return _train_step(family)
    with kernels(on):
        _train_step(family)


def _train_step(family):
    case = make(family)
    model = _unmasked(case.model).train()
    assert bmrs.noise_layers(model)
    torch.manual_seed(0)
    out = model(case.x)
    assert not torch.equal(out, model(case.x))  # θ is sampled in training ...
    # the data term alone reaches every noise layer (the KL term would give each a gradient by itself)
    out.square().mean().backward()
    for name, noise in bmrs.noise_layers(model):
        for p in (noise.mu, noise.log_sigma):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name

    kl = bmrs.kl_loss(model)
    assert kl.ndim == 0 and torch.isfinite(kl) and kl > 0
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = model(case.x).square().mean() + bmrs.kl_loss(model, num_train=100)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("bmrs_noise" in n for n in changed) and any("bmrs_noise" not in n for n in changed)
    assert torch.isfinite(bmrs.kl_loss(model))
    model.eval()
    with torch.no_grad():
        again = model(case.x)
        assert torch.isfinite(again).all() and torch.equal(again, model(case.x))  # ... and not in eval


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_prune_sets_masks_by_the_criterion(family):
    case = make(family)
    model = _unmasked(case.model).eval()
    structures = sum(noise.num_features for _, noise in bmrs.noise_layers(model))
    report = bmrs.prune(model, bmrs.criteria.SNR(), amount=0.3)
    zeros = sum(int((m == 0).sum()) for m in _masks(model).values())
    assert report.structures == structures and report.pruned == report.newly_pruned == zeros
    assert zeros == round(0.3 * structures)
    # the pruned ones have the lowest SNR of the model
    snr = torch.cat([noise.posterior().snr.detach().flatten() for _, noise in bmrs.noise_layers(model)])
    mask = torch.cat(list(_masks(model).values()))
    assert snr[mask == 0].max() <= snr[mask == 1].min()

    before = _masks(model)
    again = bmrs.prune(model, "bmrs-n")  # masks only go from 1 to 0
    for name, mask in _masks(model).items():
        assert (mask <= before[name]).all()
    assert again.pruned == sum(int((m == 0).sum()) for m in _masks(model).values()) >= zeros
    with torch.no_grad():
        assert torch.isfinite(model(case.x)).all()


def _onnx_outputs(model: torch.nn.Module, x: torch.Tensor, path) -> torch.Tensor:
    """The outputs of onnxruntime on ``model`` exported to ONNX (by the TorchScript exporter: seconds faster per
    model than the dynamo one, which ``bmrs.compaction.export`` uses and tests/test_saving.py runs)."""
    import onnxruntime as ort

    torch.onnx.export(model, (x,), str(path), opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_compact_is_exact_smaller_and_exports_to_onnx(family, tmp_path):
    case = make(family)
    model = case.model.eval()
    small = bmrs.compact(model, case.x)

    assert not small.training
    assert not any(isinstance(m, bmrs.MultiplicativeNoise) for m in small.modules())
    assert bmrs.noise_layers(small) == []
    with torch.no_grad():
        for x in (case.x, case.x_other):
            assert rel_err(small(x), model(x)) <= REL

    before, after = count(model, case.x), count(small, case.x)
    assert after["params"] < before["params"] and after["macs"] < before["macs"]
    if case.expected_params is not None:
        assert after["params"] == case.expected_params
    case.check(small)

    with torch.no_grad():
        want = model(case.x_other)
    assert rel_err(_onnx_outputs(small, case.x_other, tmp_path / f"{family}.onnx"), want) <= REL


def _step(model, optimizer, x, seed):
    torch.manual_seed(seed)
    out = model(x)
    loss = out.square().mean() + bmrs.kl_loss(model)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return out.detach()


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_shrunk_network_trains_exactly_like_the_masked_one(family):
    case = make(family)
    masked = case.model.train()
    opt = torch.optim.Adam(masked.parameters(), lr=1e-2)
    for seed in range(2):  # Adam has state before the shrink
        _step(masked, opt, case.x, seed)
    before = bmrs.pruning.structure_counts(masked)

    twin = copy.deepcopy(masked)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (load_state_dict keeps the tensors)
    small, small_opt = shrink(twin, case.x, twin_opt)
    if case.shrinks:
        assert count_params(small) < count_params(masked)
    else:
        assert (small, small_opt) == (twin, twin_opt)
    after = bmrs.pruning.structure_counts(small)
    assert (after.pruned, after.structures) == (before.pruned, before.structures)

    # (ResNet-50: one step; its BatchNorms over 4 examples at 1×1 in layer4 amplify the float32 summation order)
    steps = range(2, 3) if family == "builtin_resnet50" else range(2, 5)
    for seed in steps:  # same θ stream, same KL weights, sliced Adam moments: same trajectory
        want = _step(masked, opt, case.x, seed)
        got = _step(small, small_opt, case.x, seed)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    masked.eval(), small.eval()
    with torch.no_grad():
        want = masked(case.x_other)
        torch.testing.assert_close(small(case.x_other), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_compacted_model_saves_and_loads(family, tmp_path):
    case = make(family)
    small = bmrs.compact(case.model.eval(), case.x)
    path = tmp_path / "small.safetensors"
    bmrs.save(small, path, builder=case.builder)
    again = bmrs.load(path) if case.builder else bmrs.load(path, case.plain)
    assert not again.training and bmrs.noise_layers(again) == []
    assert count_params(again) == count_params(small)
    with torch.no_grad():
        torch.testing.assert_close(again(case.x_other), small(case.x_other), rtol=1e-6, atol=1e-6)
