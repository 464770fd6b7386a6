"""Noise layers, attach, kl_loss, criteria and prune."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import bmrs
from bmrs.training import TrainConfig
from bmrs import criteria
from bmrs.evidence import delta_f

F64 = dict(dtype=torch.float64)


def small_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3))


def set_posteriors(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _, noise in bmrs.noise_layers(model):
        with torch.no_grad():
            noise.mu.copy_(torch.empty(noise.num_features).uniform_(-25, 1, generator=g))
            noise.log_sigma.copy_(torch.empty(noise.num_features).uniform_(-6, 1, generator=g))
    return model


# --- MultiplicativeNoise --------------------------------------------------------------------------

def test_noise_training_samples_eval_uses_expectation_and_masks_zero():
    noise = bmrs.MultiplicativeNoise(4, dim=1)
    with torch.no_grad():
        noise.mu.copy_(torch.tensor([0.0, -1.0, -5.0, -30.0]))
        noise.log_sigma.copy_(torch.tensor([-5.0, -1.0, 0.0, -2.0]))
        noise.mask[1] = 0
    x = torch.ones(64, 4, 3, 3)
    noise.train()
    y = noise(x)
    assert (y[:, 1] == 0).all()
    assert (y >= 0).all() and (y <= 1).all()
    # structure granularity: one θ per (example, structure), shared over positions
    assert (y[:, 0] == y[:, 0, :1, :1]).all()
    assert y[:, 2, 0, 0].std() > 0  # but differing across examples
    noise.eval()
    expected = noise.posterior().mean * noise.mask
    assert torch.equal(noise(x)[0, :, 0, 0], expected)


class _ReusesActivationInput(nn.Module):
    """The in-place ReLU's input h is read again after the activation (a skip connection)."""

    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc(x)
        return self.out(self.act(h)) + h.sum(1, keepdim=True)


class _PassesActivationInputByKeyword(_ReusesActivationInput):
    def forward(self, x):
        h = self.fc(x)
        return self.out(self.act(input=h)) + h.sum(1, keepdim=True)


@pytest.mark.parametrize("build", [
    lambda: bmrs.attach(small_mlp()),
    lambda: bmrs.attach(_ReusesActivationInput(), targets=["act"]),  # the in-place ReLU hosts the noise
    lambda: bmrs.attach(_PassesActivationInputByKeyword(), targets=["act"]),
    lambda: bmrs.attach(nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                      nn.Linear(4 * 3 * 3, 2))),
], ids=["mlp", "inplace-host", "inplace-host-keyword", "cnn"])
def test_eval_without_grad_equals_eval_with_grad(build):
    """Without gradients evaluation scales activations in place where that is safe; the outputs must be
    those of the out-of-place multiply taken with gradients on (an in-place ReLU's input is left alone)."""
    torch.manual_seed(1)
    model = build().eval()
    for _, noise in bmrs.noise_layers(model):
        with torch.no_grad():
            noise.mu.uniform_(-1.0, 0.0)
            noise.log_sigma.uniform_(-3.0, -1.0)
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    x = torch.randn(4, 2, 8, 8) if isinstance(first, nn.Conv2d) else torch.randn(4, first.in_features)
    with_grad = model(x)
    assert with_grad.requires_grad
    with torch.no_grad():
        without = model(x)
    with torch.inference_mode():
        inference = model(x)
    assert torch.equal(without, with_grad.detach()) and torch.equal(inference, without)


def test_eval_scaling_per_input_form_and_after_parameter_changes():
    """scale_ keeps E[θ]·mask viewed per (ndim, dtype): each form gets its own view, a bad width still
    raises, and a parameter change or a new mask is seen at once."""
    noise = bmrs.MultiplicativeNoise(3, dim=1, init_mu=-0.5, init_log_sigma=-1.0).eval()
    theta = noise.posterior().mean.detach()
    with torch.no_grad():
        for shape, dtype in [((2, 3), torch.float32), ((2, 3, 4, 4), torch.float32), ((2, 3), torch.float64),
                             ((2, 3), torch.float32)]:
            x = torch.rand(shape, dtype=dtype)
            want = x * theta.to(dtype).reshape([1, 3] + [1] * (len(shape) - 2))
            assert torch.equal(noise.scale_(x.clone()), want)
        with pytest.raises(bmrs.errors.ConfigError, match="got an input of shape"):
            noise.scale_(torch.rand(2, 4))
        noise.mask[1] = 0
        assert noise.scale_(torch.ones(2, 3))[:, 1].eq(0).all()
        noise.mu.fill_(-3.0)
        assert torch.allclose(noise.scale_(torch.ones(2, 3))[0, 0], noise.posterior().mean[0])


def test_element_granularity_draws_per_element():
    noise = bmrs.MultiplicativeNoise(3, dim=-1, granularity="element", init_log_sigma=0.0, init_mu=-2.0)
    y = noise(torch.ones(8, 5, 3))
    assert y.shape == (8, 5, 3)
    assert y[:, :, 0].flatten().unique().numel() > 30


def test_eval_cache_invalidated_by_optimizer_step_and_mask_change():
    noise = bmrs.MultiplicativeNoise(3).eval()
    first = noise.expected_theta()
    assert noise.expected_theta() is first  # cached
    opt = torch.optim.SGD(noise.parameters(), lr=0.5)
    noise.train()
    noise(torch.ones(2, 3)).sum().backward()
    opt.step()
    noise.eval()
    second = noise.expected_theta()
    assert not torch.equal(first, second)
    noise.mask[0] = 0
    assert noise.expected_theta()[0] == 0
    noise.set_bounds(-10.0, 0.0)  # the bounds are part of what the value was computed from
    torch.testing.assert_close(noise.expected_theta(), noise.posterior().mean * noise.mask)


@pytest.mark.parametrize("write", ["data", "fused_adam", "load_state_dict"])
def test_eval_cache_sees_writes_that_bump_no_version_counter(write):
    torch.manual_seed(0)
    noise = bmrs.MultiplicativeNoise(4).eval()
    before = noise.expected_theta().clone()
    if write == "data":
        noise.mu.data.fill_(-3.0)
    elif write == "fused_adam":
        opt = torch.optim.Adam(noise.parameters(), lr=0.5, fused=True)
        noise.train()
        noise(torch.ones(2, 4)).sum().backward()
        opt.step()
        noise.eval()
    else:
        noise.load_state_dict({**noise.state_dict(), "log_sigma": torch.zeros(4)})
    assert not torch.equal(noise.expected_theta(), before)
    torch.testing.assert_close(noise.expected_theta(), noise.posterior().mean * noise.mask)


def test_frozen_noise_reuses_e_theta_unchecked_until_the_block_ends():
    net = bmrs.attach(small_mlp()).eval()
    noise = bmrs.noise_layers(net)[0][1]
    x = torch.randn(4, 5)
    with bmrs.frozen_noise(net):
        first = net(x)
        noise.mask.zero_()  # inside the block: not seen (as with torch.nn.utils.parametrize.cached)
        assert torch.equal(net(x), first)
        with bmrs.frozen_noise(net):  # nested: the outer block ends it
            pass
        assert torch.equal(net(x), first)
    assert not torch.equal(net(x), first)  # after the block: the zeroed mask is seen
    assert not noise._frozen


def test_noise_state_dict_roundtrip_with_weights_only():
    model = set_posteriors(bmrs.attach(small_mlp()))
    bmrs.noise_layers(model)[0][1].mask[2] = 0
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = bmrs.attach(small_mlp())
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(4, 5)
    assert torch.equal(model.eval()(x), fresh.eval()(x))
    assert bmrs.noise_layers(fresh)[0][1].mask[2] == 0


def test_gradients_reach_mu_and_log_sigma():
    model = bmrs.attach(small_mlp())
    loss = model(torch.randn(8, 5)).sum() + bmrs.kl_loss(model)
    loss.backward()
    for _, noise in bmrs.noise_layers(model):
        assert noise.mu.grad is not None and torch.isfinite(noise.mu.grad).all()
        assert noise.log_sigma.grad is not None and noise.log_sigma.grad.abs().sum() > 0


def test_noise_rejects_bad_arguments_and_mismatched_input():
    with pytest.raises(bmrs.ConfigError):
        bmrs.MultiplicativeNoise(0)
    with pytest.raises(bmrs.ConfigError):
        bmrs.MultiplicativeNoise(3, low=0.0, high=-1.0)
    with pytest.raises(bmrs.ConfigError):
        bmrs.MultiplicativeNoise(3, granularity="pixel")
    with pytest.raises(bmrs.ConfigError, match="got an input of shape"):
        bmrs.MultiplicativeNoise(3)(torch.ones(2, 4))


# --- attach -------------------------------------------------------------------------------------------

def test_attach_default_policy_mlp_and_cnn():
    mlp = bmrs.attach(small_mlp())
    assert [(n, l.num_features, l.producer) for n, l in bmrs.noise_layers(mlp)] == [("1", 7, "0"), ("3", 6, "2")]
    assert "bmrs_noise" in repr(mlp)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(5 * 4 * 4, 10))
    bmrs.attach(cnn)
    assert [(n, l.num_features, l.dim) for n, l in bmrs.noise_layers(cnn)] == [("1", 4, 1), ("4", 5, 1)]
    assert cnn(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_attach_default_policy_puts_noise_after_a_linear_layers_batchnorm_so_pruned_units_go():
    # on the Linear, a pruned unit would come out of the BatchNorm as a constant, never removable
    torch.manual_seed(0)
    model = bmrs.attach(nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)))
    assert [(n, l.dim, l.producer) for n, l in bmrs.noise_layers(model)] == [("1", 1, "0")]
    noise = bmrs.noise_layers(model)[0][1]
    with torch.no_grad():
        noise.mask[:8] = 0
    x = torch.randn(8, 10)
    small = bmrs.compact(model.eval(), x)
    assert small[0].out_features == 8
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5)


def test_attach_explicit_targets_and_attention():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            a, _ = self.attn(x, x, x)
            return self.head(torch.relu(self.fc(x + a)))

    block = bmrs.attach(Block(), targets=["attn", nn.Linear])
    layers = dict(bmrs.noise_layers(block))
    assert set(layers) == {"attn", "fc", "head"}  # explicit targets may include the head
    assert layers["attn"].num_features == 2 and layers["attn"].head_dim == 4  # naming attention gates its heads
    out = block(torch.randn(2, 4, 8))
    assert out.shape == (2, 4, 3)
    # default policy on the same block: its heads; not the output layer, the projections inside the
    # attention, nor fc, whose outputs have the width of the attention output it reads (a stream writer)
    default = dict(bmrs.noise_layers(bmrs.attach(Block())))
    assert set(default) == {"attn"}


def test_attach_errors():
    with pytest.raises(bmrs.ModelError, match="nothing to attach"):
        bmrs.attach(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(bmrs.ModelError, match="already has noise"):
        bmrs.attach(bmrs.attach(small_mlp()))
    with pytest.raises(bmrs.ModelError, match="no module named"):
        bmrs.attach(small_mlp(), targets=["nope"])
    with pytest.raises(bmrs.ConfigError):
        bmrs.attach(small_mlp(), targets=[3])
    with pytest.raises(bmrs.ConfigError, match="list of module names"):
        bmrs.attach(small_mlp(), targets=3)
    with pytest.raises(bmrs.ConfigError):
        bmrs.attach("not a model")
    # one name or type on its own stands for the list of it
    assert [n for n, _ in bmrs.noise_layers(bmrs.attach(small_mlp(), targets=nn.Linear))] == \
        [n for n, _ in bmrs.noise_layers(bmrs.attach(small_mlp(), targets=[nn.Linear]))]
    only = bmrs.attach(small_mlp(), targets="0")
    assert [n for n, _ in bmrs.noise_layers(only)] == ["0"]


def test_kl_loss_reductions():
    model = set_posteriors(bmrs.attach(small_mlp()))
    kls = [noise.kl() for _, noise in bmrs.noise_layers(model)]
    assert torch.allclose(bmrs.kl_loss(model), torch.stack([k.mean() for k in kls]).mean())
    assert torch.allclose(bmrs.kl_loss(model, "elbo", num_train=100), sum(k.sum() for k in kls) / 100)
    # the same weight on every structure (layers of 7 and 6 here), pruned ones keeping their place
    assert torch.allclose(bmrs.kl_loss(model, "structure-mean"), torch.cat(kls).mean())
    bmrs.prune(model, criteria.SNR(), amount=5)
    kls = [noise.kl() for _, noise in bmrs.noise_layers(model)]
    assert torch.allclose(bmrs.kl_loss(model, "structure-mean"), torch.cat(kls).sum() / 13)
    with pytest.raises(bmrs.ConfigError, match="num_train"):
        bmrs.kl_loss(model, "elbo")
    with pytest.raises(bmrs.ConfigError):
        bmrs.kl_loss(model, "sum")
    with pytest.raises(bmrs.ModelError):
        bmrs.kl_loss(small_mlp())



def test_shared_block_gets_one_noise_layer_weighed_once_by_kl_loss():
    """A block used in two places is gated once (one noise layer, one hook), a None child is skipped, and
    kl_loss's mean weighs each noise layer once."""
    torch.manual_seed(0)
    shared = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Sequential(shared, nn.Linear(6, 6), nn.Tanh()), shared,
                          nn.Linear(6, 3))
    model = set_posteriors(bmrs.attach(model))
    model.add_module("unused", None)
    listed = [noise for _, noise in bmrs.noise_layers(model)]
    assert len(listed) == 3
    assert len(shared[1]._forward_hooks) == 1  # the shared block is gated once, wherever it runs
    expected = torch.stack([noise.kl().mean() for noise in listed]).mean()
    assert torch.allclose(bmrs.kl_loss(model.eval()), expected)

# --- criteria -------------------------------------------------------------------------------------------

def test_bmrs_criteria_score_exact_delta_f_and_decide_by_the_stated_rule():
    model = set_posteriors(bmrs.attach(small_mlp()))
    for margin in (0.0, 1.0, 3.5):
        for crit, reduced in [(criteria.BMRSN(margin=margin), bmrs.spike_prior()),
                              (criteria.BMRSU(8, margin=margin), bmrs.precision_prior(8)),
                              (criteria.BMRSU(4, margin=margin), bmrs.precision_prior(4))]:
            decisions = crit.decide(model)
            scores = crit.scores(model)
            for name, noise in bmrs.noise_layers(model):
                q = noise.posterior()
                df = delta_f(q, bmrs.TruncatedLogUniform(), reduced).double()
                off = q.mean.double() < 2.0 ** -23
                assert torch.equal(scores[name], df)  # the scores stay the exact ΔF
                assert torch.equal(decisions[name], (df >= -margin) | off)
    exact = sum(int(d.sum()) for d in criteria.BMRSN(margin=0).decide(model).values())
    assert 0 < exact < 13  # the random posteriors make some, not all, prunable


def _one_layer(mu, sigma):
    model = bmrs.attach(nn.Sequential(nn.Linear(3, len(mu)), nn.Tanh(), nn.Linear(len(mu), 2)))
    name, noise = bmrs.noise_layers(model)[0]
    with torch.no_grad():
        noise.mu.copy_(torch.tensor(mu))
        noise.log_sigma.copy_(torch.tensor(sigma).log())
    return model, name


def test_evidence_that_is_not_worth_a_mention_is_a_tie_that_goes_to_the_smaller_model():
    # prior-like (ΔF_N ≈ -0.05), weakly kept (-1.5), informative (≈ -70), exactly prunable (μ at a)
    model, name = _one_layer([-1.3, -1.3, -0.5, -20.0], [40.0, 9.0, 0.3, 2.0])
    df = criteria.BMRSN().scores(model)[name]
    assert -1 < float(df[0]) < 0 and -2 < float(df[1]) < -1 and float(df[2]) < -50 and float(df[3]) > 0
    assert criteria.BMRSN().decide(model)[name].tolist() == [True, False, False, True]
    assert criteria.BMRSN(margin=0).decide(model)[name].tolist() == [False, False, False, True]
    assert criteria.BMRSN(margin=2).decide(model)[name].tolist() == [True, True, False, True]
    # the published code's +½ ln 2π decides like a 0.919-nat margin without the switched-off rule
    assert criteria.PublishedBMRSN().decide(model)[name].tolist() == [True, False, False, True]


def test_switched_off_structures_are_pruned_by_both_rules_and_ranked_first():
    # collapsed below 2^-23 (BMRS_N: ΔF_N = -15; BMRS_U: far below its reduced prior), collapsed at μ = -30,
    # an informative one, and one a little above 2^-23
    model, name = _one_layer([-17.0, -30.0, -0.5, -15.0], [0.5, 1.0, 0.3, 0.05])
    off = criteria.BMRSN().switched_off(model)[name]
    assert off.tolist() == [True, True, False, False]
    assert float(criteria.BMRSN().scores(model)[name][0]) < -10
    assert float(criteria.BMRSU(8).scores(model)[name][1]) < -5
    for crit in (criteria.BMRSN(), criteria.BMRSU(8), criteria.BMRSU(4)):
        assert crit.decide(model)[name].tolist()[:3] == [True, True, False]
        assert crit.decide(model, amount=2)[name].tolist() == [True, True, False, False]
    assert criteria.PublishedBMRSN().decide(model)[name].tolist()[0] is False  # ΔF alone


def test_evidence_margin_is_validated_and_shown():
    assert repr(criteria.BMRSN()) == "BMRSN(margin=1, variance=1e-12)"
    assert repr(criteria.BMRSU(4, margin=0.5)) == "BMRSU(p1=4, margin=0.5)"
    for bad in (-0.1, float("nan"), float("inf"), "1", True):
        with pytest.raises(bmrs.ConfigError, match="evidence margin"):
            criteria.BMRSN(margin=bad)
    with pytest.raises(bmrs.ConfigError, match="evidence_margin|evidence margin"):
        TrainConfig(evidence_margin=-1)


def test_a_rule_that_prunes_nothing_says_why_in_one_line():
    model = bmrs.attach(small_mlp())  # at initialisation every posterior is narrow
    with pytest.warns(bmrs.pruning.PruningWarning, match=r"pruned nothing: the widest posterior has σ = .*noise_lr|param_groups"):
        report = bmrs.prune(model, criteria.BMRSN())
    assert report.pruned == 0


def test_param_groups_give_the_noise_parameters_their_own_rate():
    model = bmrs.attach(small_mlp())
    groups = bmrs.param_groups(model, lr=2e-3, noise_lr_scale=5)
    noise_params = {id(p) for _, n in bmrs.noise_layers(model) for p in (n.mu, n.log_sigma)}
    assert {id(p) for p in groups[1]["params"]} == noise_params and groups[1]["lr"] == pytest.approx(1e-2)
    assert not noise_params & {id(p) for p in groups[0]["params"]} and groups[0]["lr"] == 2e-3
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    with pytest.raises(bmrs.ConfigError, match="noise_lr_scale"):
        bmrs.param_groups(model, lr=1e-3, noise_lr_scale=0)


def test_snr_and_expected_value_thresholds_by_hand():
    noise_model = bmrs.attach(small_mlp())
    name, noise = bmrs.noise_layers(noise_model)[0]
    with torch.no_grad():
        noise.mu.copy_(torch.tensor([0.0, -1.0, -2.5, -3.0, -30.0, -0.5, -2.0]))
        noise.log_sigma.copy_(torch.tensor([-5.0, 0.5, -5.0, 1.0, -1.0, -5.0, -5.0]))
    q = noise.posterior()
    assert torch.equal(criteria.SNR().decide(noise_model)[name], q.snr.double() < 1.0)
    assert torch.equal(criteria.ExpectedValue().decide(noise_model)[name], q.mean.double() < 0.1)
    # E[θ] for a narrow posterior at μ is ≈ e^μ: −2.5 → 0.082 (prune), −2.0 → 0.135 (keep)
    assert criteria.ExpectedValue().decide(noise_model)[name][[2, 6]].tolist() == [True, False]
    assert criteria.SNR(threshold=0.0).decide(noise_model)[name].sum() == 0


def test_l2_norm_ranks_by_incoming_weights():
    model = bmrs.attach(small_mlp())
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(7.0)[:, None].expand(7, 5) + 1)
        model[2].weight.fill_(10.0)
    scores = criteria.L2Norm().scores(model)
    assert torch.allclose(scores["1"], (torch.arange(7.0) + 1).double() * math.sqrt(5))
    decisions = criteria.L2Norm().decide(model, amount=3)
    assert decisions["1"].tolist() == [True, True, True, False, False, False, False]
    assert decisions["3"].sum() == 0
    with pytest.raises(bmrs.ConfigError, match="amount"):
        criteria.L2Norm().decide(model)


def test_global_amount_counts_already_pruned_and_validates():
    model = bmrs.attach(small_mlp())
    bmrs.noise_layers(model)[1][1].mask[:4] = 0
    decisions = criteria.L2Norm().decide(model, amount=0.5)  # 13 structures → 6 (round(6.5) = 6)
    assert sum(int(d.sum()) for d in decisions.values()) == 6
    assert decisions["3"][:4].all()
    assert sum(int(d.sum()) for d in criteria.L2Norm().decide(model, amount=1).values()) == 4
    for bad in (-1, 1.5, 14, "x", True, float("nan"), np.int64(14), torch.tensor(-1)):
        with pytest.raises(bmrs.ConfigError):
            criteria.L2Norm().decide(model, amount=bad)
    # NumPy and 0-d torch numbers count as the Python numbers they hold
    for count in (np.int64(6), torch.tensor(6), np.float32(0.5), torch.tensor(0.5)):
        assert sum(int(d.sum()) for d in criteria.L2Norm().decide(model, amount=count).values()) == 6


def test_gradient_criterion_matches_manual_taylor_scores():
    torch.manual_seed(3)
    model = bmrs.attach(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    crit = criteria.Gradient()
    crit.accumulate(model, [(x[:5], y[:5]), (x[5:], y[5:])])
    # manual: activation a = θ·relu(Wx+b) (eval), gradient of the batch-mean loss w.r.t. a
    model.eval()
    want = torch.zeros(6, dtype=torch.float64)
    for xb, yb in [(x[:5], y[:5]), (x[5:], y[5:])]:
        a = (torch.relu(model[0](xb)) * bmrs.noise_layers(model)[0][1].expected_theta()).detach().requires_grad_()
        loss = nn.functional.cross_entropy(model[2](a), yb)
        (g,) = torch.autograd.grad(loss, a)
        want += (a * g).abs().sum(0).double()
    assert torch.allclose(crit.scores(model)["1"], want, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(bmrs.ConfigError, match="accumulate"):
        criteria.Gradient().scores(model)


def test_gradient_criterion_scores_layers_after_frozen_ones():
    torch.manual_seed(3)
    model = bmrs.attach(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)))
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    want = criteria.Gradient()
    want.accumulate(model, batches)
    model[0].requires_grad_(False)  # fine-tuning the later layers only: the scores are the same
    got = criteria.Gradient()
    got.accumulate(model, batches)
    assert all(torch.allclose(got.scores(model)[k], v) for k, v in want.scores(model).items())
    assert model[0].weight.grad is None and model[2].weight.grad is None
    # an integer input (token ids) into a frozen embedding: nothing before the noise needs a gradient
    tokens = bmrs.attach(nn.Sequential(nn.Embedding(7, 6), nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)))
    tokens[0].requires_grad_(False)
    tokens[2].requires_grad_(False)
    with pytest.raises(bmrs.ConfigError, match="noise layer '3' got no gradient"):
        criteria.Gradient().accumulate(tokens, [(torch.randint(0, 7, (4, 2)), torch.randint(0, 3, (4,)))])


def test_prune_sets_masks_monotonically_and_reports():
    model = set_posteriors(bmrs.attach(small_mlp()))
    report = bmrs.prune(model, criteria.BMRSN())
    masks = [noise.mask.clone() for _, noise in bmrs.noise_layers(model)]
    assert report.pruned == sum(int((m == 0).sum()) for m in masks) == report.newly_pruned
    assert report.structures == 13 and report.kept == 13 - report.pruned
    assert "total" in str(report) and report.as_dict()["layers"][0]["structures"] == 7
    # a criterion that would keep everything does not resurrect pruned structures
    again = bmrs.prune(model, criteria.SNR(threshold=-1.0))
    assert again.newly_pruned == 0 and again.pruned == report.pruned


def test_get_criterion():
    assert isinstance(criteria.get_criterion("bmrs-n"), criteria.BMRSN)
    assert criteria.get_criterion("bmrs-u", p1=4).p1 == 4
    with pytest.raises(bmrs.ConfigError, match="unknown criterion"):
        criteria.get_criterion("magic")
    with pytest.raises(bmrs.ConfigError, match="'snr'.*p1"):
        criteria.get_criterion("snr", p1=3)
    with pytest.raises(bmrs.ConfigError, match="p1"):
        criteria.BMRSU(p1=23)


def test_published_bmrs_n_adds_half_log_two_pi():
    model = set_posteriors(bmrs.attach(small_mlp()), seed=4)
    exact, published = criteria.BMRSN().scores(model), criteria.PublishedBMRSN().scores(model)
    for name in exact:
        small = exact[name].abs() < 100  # where float32 resolves the offset
        assert torch.allclose(published[name][small] - exact[name][small],
                              torch.full_like(exact[name][small], 0.5 * math.log(2 * math.pi)), atol=1e-4)
        exact_d, published_d = {n: s >= 0 for n, s in exact.items()}, criteria.PublishedBMRSN().decide(model)
    assert all(bool((published_d[n] | ~exact_d[n]).all()) for n in exact_d)  # prunes a superset


class _TokensThenPool(nn.Module):
    """Linear layers on (tokens, examples, features) or (examples, tokens, features), pooled over tokens."""

    def __init__(self, token_axis: int):
        super().__init__()
        self.token_axis = token_axis
        self.fc, self.act, self.out = nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.act(self.fc(x)).mean(self.token_axis))


def _theta_seen(model, noise, x):
    """θ the layer applied in a training forward: output ÷ input."""
    seen = {}
    handle = noise.register_forward_hook(lambda m, inp, out: seen.setdefault("theta", (out / inp[0]).detach()))
    model.train()
    model(x)
    handle.remove()
    return seen["theta"]


def test_sequence_first_layers_draw_theta_per_example_shared_across_tokens():
    torch.manual_seed(0)
    tokens, examples = 5, 3
    # inside nn.TransformerEncoderLayer (batch_first=False by default) the layers are found sequence-first
    encoder = bmrs.attach(nn.Sequential(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0)))
    assert {name: noise.batch_dim for name, noise in bmrs.noise_layers(encoder)} == {"0.self_attn": 1, "0.linear1": 1}
    # a whole model declared sequence-first
    model = bmrs.attach(_TokensThenPool(token_axis=0), targets=["act"], batch_dim=1)
    (_, noise), = bmrs.noise_layers(model)
    with torch.no_grad():
        noise.mu.fill_(-3.0)
        noise.log_sigma.fill_(1.0)  # wide: θ visibly random
    for net, layer in [(model, noise)] + [(encoder, n) for _, n in bmrs.noise_layers(encoder)]:
        theta = _theta_seen(net, layer, torch.randn(tokens, examples, 6 if net is model else 16))
        torch.testing.assert_close(theta, theta[:1].expand_as(theta))  # the same θ for every token of an example
        assert (theta[0].std(0) > 0).any()  # but not for every example
    with pytest.raises(bmrs.ConfigError, match="batch_dim"):
        bmrs.attach(_TokensThenPool(0), batch_dim=2)


def test_gradient_scores_of_a_sequence_first_model_equal_its_batch_first_twin():
    torch.manual_seed(1)
    first = bmrs.attach(_TokensThenPool(token_axis=0), targets=["act"], batch_dim=1)
    twin = bmrs.attach(_TokensThenPool(token_axis=1), targets=["act"])
    twin.load_state_dict(first.state_dict())
    x, y = torch.randn(5, 4, 6), torch.randint(0, 3, (4,))
    scores = []
    for net, inputs in ((first, x), (twin, x.transpose(0, 1))):
        crit = bmrs.criteria.Gradient()
        crit.accumulate(net, [(inputs, y)])
        scores.append(crit.layer_scores("act", None, net))
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-6, atol=1e-9)


def test_noise_hooks_registered_without_kwargs_still_apply():
    # models pickled before the hooks took keyword inputs hold them without the with_kwargs flag
    torch.manual_seed(2)
    model = set_posteriors(bmrs.attach(small_mlp())).eval()
    x = torch.randn(4, small_mlp()[0].in_features)
    with torch.no_grad():
        want = model(x)
        for module in model.modules():
            module._forward_hooks_with_kwargs.clear()
        assert torch.equal(model(x), want)


class _HeadFirst(nn.Module):
    """The output layer registered before the body, the norms after all the convolutions, two heads."""

    def __init__(self):
        super().__init__()
        self.fc, self.aux = nn.Linear(6, 3), nn.Linear(6, 2)
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 6, 3)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(6)

    def forward(self, x):
        h = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))).mean((2, 3))
        return {"main": self.fc(h), "aux": self.aux(h)}


def test_attach_default_policy_follows_the_data_flow_not_registration_order():
    model = bmrs.attach(_HeadFirst())
    assert [(n, l.producer, l.num_features) for n, l in bmrs.noise_layers(model)] == [
        ("bn1", "conv1", 4), ("bn2", "conv2", 6)]  # no noise on either head; each BatchNorm gates its own conv
    explicit = bmrs.attach(_HeadFirst(), targets=[nn.BatchNorm2d])
    assert [(n, l.producer) for n, l in bmrs.noise_layers(explicit)] == [("bn1", "conv1"), ("bn2", "conv2")]
    out = model(torch.randn(2, 1, 8, 8))
    assert out["main"].shape == (2, 3) and out["aux"].shape == (2, 2)


def test_attach_default_policy_keeps_noise_off_an_activation_shared_by_layers_of_different_widths():
    act = nn.ReLU()
    model = bmrs.attach(nn.Sequential(nn.Linear(6, 8), act, nn.Linear(8, 5), act, nn.Linear(5, 2)))
    assert [(n, l.num_features) for n, l in bmrs.noise_layers(model)] == [("0", 8), ("2", 5)]
    assert model(torch.randn(3, 6)).shape == (3, 2)


def test_api_misuse_gets_a_sentence_that_says_what_to_do():
    model = bmrs.attach(small_mlp())
    with pytest.raises(bmrs.ConfigError, match=r"BMRSN\(\) \(with its options\), not the class"):
        bmrs.prune(model, criteria.BMRSN)
    with pytest.raises(bmrs.ConfigError, match="got NoneType"):
        bmrs.prune(model, None)
    with pytest.warns(bmrs.pruning.PruningWarning):
        assert bmrs.prune(model, "bmrs-n").structures == 13  # a criterion's name serves too
    scripted = torch.jit.script(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    with pytest.raises(bmrs.ConfigError, match="not a TorchScript one"):
        bmrs.attach(scripted)
    empty = bmrs.TruncatedLogNormal(torch.zeros(0), torch.ones(0))
    for reduced in (bmrs.spike_prior(), bmrs.precision_prior(8)):
        assert bmrs.delta_f(empty, bmrs.TruncatedLogUniform(), reduced).shape == (0,)


def test_noise_bounds_are_validated_and_the_cached_expectation_follows_them():
    noise = bmrs.MultiplicativeNoise(3).eval()
    with torch.no_grad():
        noise.mu.fill_(-3.0)
        noise.log_sigma.fill_(0.0)
    before = noise.expected_theta().clone()
    noise.low = -5.0  # a narrower interval: E[θ] changes (it stayed cached before)
    assert not torch.allclose(noise.expected_theta(), before)
    torch.testing.assert_close(noise.expected_theta(), noise.posterior().mean * noise.mask)
    with pytest.raises(bmrs.ConfigError, match="smaller than high"):
        noise.low = 1.0
    with pytest.raises(bmrs.ConfigError, match="finite"):
        noise.high = float("nan")
    assert (noise.low, noise.high) == (-5.0, 0.0)
