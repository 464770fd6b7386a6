"""bmrs.nn.fused_draw (all noise layers in one kernel call) against the reference path: the
per-layer PyTorch code with the kernels off, in float64 (to rounding) and float32."""

from __future__ import annotations

import pytest
import torch

import bmrs
from bmrs.distributions.fast_sample import sample_theta
from bmrs.nn.fused_draw import kl_layers, sample_layers
from bmrs.nn.noise import sigma_of
from bmrs.nn.uniforms import draw_key, reference_uniforms

# the kernels themselves, compared with the reference: on in a BMRS_KERNELS=0 session too
pytestmark = pytest.mark.usefixtures("kernels_on")

LOW, HIGH = -20.0, 0.0
SIZES = (5, 17, 3)
KEY = (0x12345678, 0x9ABCDEF0, 0x0F1E2D3C, 0xFFFFFFFF)
KEPT = [torch.arange(size) for size in SIZES]


def _layers(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mus, log_sigmas, masks = [], [], []
    for size in SIZES:
        mu = torch.empty(size, dtype=dtype).uniform_(-19.5, -0.5, generator=g)
        mu[1] = 0.0  # a bound at the mean
        mus.append(mu.requires_grad_())
        ls = torch.empty(size, dtype=dtype).uniform_(-8, 2, generator=g)
        ls[1:3] = 0.5
        mu.data[2] = 0.7  # the mean outside, 0.7 ≈ 0.4σ above the upper bound
        ls[0] = -25.0 if size > 4 else ls[0]  # below the clamp of log σ: no gradient through it
        ls[-1] = 6.0 if size > 10 else ls[-1]  # above it
        log_sigmas.append(ls.requires_grad_())
        masks.append((torch.rand(size, generator=g) > 0.25).to(dtype))
    return mus, log_sigmas, masks


def _grads(outputs, params, seed=1):
    g = torch.Generator().manual_seed(seed)
    loss = sum((out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum() for out in outputs)
    return torch.autograd.grad(loss, params)


def _reference_thetas(mus, log_sigmas, masks, u):
    sigma = sigma_of(torch.cat(log_sigmas))
    theta = sample_theta(torch.cat(mus), sigma, LOW, HIGH, u, torch.cat(masks))
    return list(torch.split(theta, [m.numel() for m in mus], dim=1))


def _fused(mus, log_sigmas, masks, row_first=3, rows=7, kept=KEPT, full_widths=SIZES):
    """θ of every layer (or None where the kernels cannot serve)."""
    out = _fused_with_kl(mus, log_sigmas, masks, row_first, rows, kept, full_widths)
    return None if out is None else out[0]


def _fused_with_kl(mus, log_sigmas, masks, row_first=3, rows=7, kept=KEPT, full_widths=SIZES, coefs=None):
    return sample_layers(mus, log_sigmas, masks, KEY, row_first, rows, kept, full_widths, LOW, HIGH, coefs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sampling_all_layers_matches_the_per_layer_reference(kernels, dtype):
    mus, log_sigmas, masks = _layers(dtype)
    fused = _fused(mus, log_sigmas, masks)
    assert fused is not None
    # the kernel forms the uniforms of rows 3 … 9 and columns 0 … 24 in its lanes: the same stream
    u = reference_uniforms(KEY, torch.arange(3, 10), torch.arange(sum(SIZES)), dtype)
    with kernels(False):
        reference = _reference_thetas(mus, log_sigmas, masks, u)
    params = mus + log_sigmas
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    fused_grads = _grads(fused, params)
    for got, want in zip(fused_grads, _grads(reference, params)):
        torch.testing.assert_close(got, want, rtol=rtol * 10, atol=rtol * 10 * float(want.abs().max()))
    for grad, ls in zip(fused_grads[len(mus):], log_sigmas):
        clamped = (ls.detach() < -20) | (ls.detach() > 5)
        assert bool(clamped.any() | (ls.numel() < 5)) and bool((grad[clamped] == 0).all())


@pytest.mark.parametrize("widths", [(150, 150), (6, 16, 120, 84)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_draw_and_gradient_are_the_same_on_one_thread_and_on_two(dtype, widths):
    # wide enough (128 rows) that the draw and the backward's column sums split their column blocks between
    # two threads (for LeNet-5's widths inside the 120-wide layer, which then runs as two segments, not one):
    # every column is still drawn and summed by one thread in row order
    g = torch.Generator().manual_seed(3)
    mus = [torch.empty(w, dtype=dtype).uniform_(-3, 0, generator=g).requires_grad_() for w in widths]
    log_sigmas = [torch.empty(w, dtype=dtype).uniform_(-5, 0, generator=g).requires_grad_() for w in widths]
    masks, kept = [torch.ones(w, dtype=dtype) for w in widths], [torch.arange(w) for w in widths]
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            thetas, kl, weighted, _ = sample_layers(mus, log_sigmas, masks, KEY, 0, 128, kept, list(widths), LOW, HIGH)
            results.append([t.detach() for t in thetas] + [kl.detach()]
                           + list(_grads(thetas + [weighted], mus + log_sigmas)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_narrowed_layers_and_row_slices_draw_the_full_networks_theta(dtype):
    # shrink keeps some structures of each layer (their original positions in `kept`), a distributed
    # shard some rows: both must draw exactly what the full network draws for them
    mus, log_sigmas, masks = _layers(dtype)
    with torch.no_grad():
        full = _fused(mus, log_sigmas, masks, row_first=0, rows=9)
    keep = [torch.tensor([0, 3]), torch.tensor([1, 2, 16]), torch.tensor([2])]
    part = _fused([m[k] for m, k in zip(mus, keep)], [s[k] for s, k in zip(log_sigmas, keep)],
                  [m[k] for m, k in zip(masks, keep)], row_first=4, rows=3, kept=keep)
    for whole, narrow, k in zip(full, part, keep):
        assert torch.equal(narrow.detach(), whole[4:7, k])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_kl_formed_beside_theta_matches_the_kl_kernel_and_its_gradient_joins_thetas(dtype):
    mus, log_sigmas, masks = _layers(dtype)
    coefs = [0.5, 1.0, 2.0]
    thetas, kl, weighted, spent = _fused_with_kl(mus, log_sigmas, masks, coefs=coefs)
    assert not bool(spent) and not spent.requires_grad
    assert kl.shape == (len(SIZES),) and kl.dtype == dtype
    assert weighted.shape == () and weighted.dtype == dtype
    params = mus + log_sigmas
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for layer in range(len(SIZES)):  # each layer's KL alone, against kl_layers with the others weighted 0
        alone = kl_layers(mus, log_sigmas, [float(i == layer) for i in range(len(SIZES))], LOW, HIGH)
        torch.testing.assert_close(kl[layer], alone, rtol=rtol, atol=0)
    # one backward through θ and the weighted KL together = the two gradients added
    weights = torch.tensor(coefs, dtype=dtype)
    together = torch.autograd.grad(sum(t.sum() for t in thetas) + (kl * weights).sum(), params)
    theta_part = torch.autograd.grad(sum(t.sum() for t in _fused(mus, log_sigmas, masks)), params)
    kl_part = torch.autograd.grad(kl_layers(mus, log_sigmas, coefs, LOW, HIGH), params)
    for got, a, b in zip(together, theta_part, kl_part):
        torch.testing.assert_close(got, a + b, rtol=rtol * 10, atol=rtol * 10 * float((a + b).abs().max()))
    assert bool(spent)  # the backward ran: the node's saved tensors are gone
    # the weighted sum formed in the node: the same value and gradient as kl_layers with those weights,
    # and its gradient adds to the per-layer KL's when the loss uses both
    thetas, kl, weighted, _ = _fused_with_kl(mus, log_sigmas, masks, coefs=coefs)
    torch.testing.assert_close(weighted, kl_layers(mus, log_sigmas, coefs, LOW, HIGH), rtol=rtol, atol=0)
    both = torch.autograd.grad(3.0 * weighted + kl[1], params)
    want = torch.autograd.grad(kl_layers(mus, log_sigmas, [3 * c + (i == 1) for i, c in enumerate(coefs)], LOW, HIGH),
                               params)
    for got, w in zip(both, want):
        torch.testing.assert_close(got, w, rtol=rtol * 10, atol=rtol * 10 * float(w.abs().max()))


@pytest.mark.parametrize("reduction", ["mean", "elbo"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kl_of_all_layers_matches_kl_loss_reference(kernels, dtype, reduction):
    net = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 17),
                                          torch.nn.ReLU(), torch.nn.Linear(17, 3), torch.nn.ReLU(),
                                          torch.nn.Linear(3, 2))).to(dtype)
    mus, log_sigmas, _ = _layers(dtype)
    with torch.no_grad():
        for (_, noise), mu, ls in zip(bmrs.noise_layers(net), mus, log_sigmas):
            noise.mu.copy_(mu)
            noise.log_sigma.copy_(ls)
    params = [p for _, n in bmrs.noise_layers(net) for p in (n.mu, n.log_sigma)]
    kw = dict(reduction=reduction, num_train=1000 if reduction == "elbo" else None)
    fused = bmrs.kl_loss(net, **kw)
    assert "KLLayers" in type(fused.grad_fn).__name__
    with kernels(False):
        reference = bmrs.kl_loss(net, **kw)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(fused, reference, rtol=rtol, atol=0)
    for got, want in zip(torch.autograd.grad(fused, params), torch.autograd.grad(reference, params)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


def test_the_kernels_own_key_is_the_one_draw_key_takes_from_the_generator():
    # with key=None the kernel draws the four words itself (without torch.randint): the same words, and the
    # same generator state after, as the reference path's draw_key()
    mus, log_sigmas, masks = _layers(torch.float64)
    for seed in (0, 1, 12345):
        torch.manual_seed(seed)
        own = sample_layers(mus, log_sigmas, masks, None, 0, 4, KEPT, SIZES, LOW, HIGH)
        after_own = torch.rand(3)
        torch.manual_seed(seed)
        key = draw_key()
        given = sample_layers(mus, log_sigmas, masks, key, 0, 4, KEPT, SIZES, LOW, HIGH)
        assert torch.equal(after_own, torch.rand(3))
        for a, b in zip(own[0], given[0]):
            assert torch.equal(a, b)


def test_outputs_left_out_of_the_loss_get_no_gradient_and_break_nothing():
    # the node leaves unused outputs' gradients undefined (no tensors of zeros): a loss on one layer's θ
    # alone gives the other layers' parameters zero gradient, and the KL alone gives exactly its gradient
    mus, log_sigmas, masks = _layers(torch.float64)
    thetas, kl, weighted, _ = _fused_with_kl(mus, log_sigmas, masks)
    grads = torch.autograd.grad(thetas[1].sum(), mus + log_sigmas, allow_unused=True)
    for i in (0, 2):
        assert grads[i] is None or bool((grads[i] == 0).all())
        assert grads[3 + i] is None or bool((grads[3 + i] == 0).all())
    assert bool((grads[1] != 0).any())
    thetas, kl, weighted, _ = _fused_with_kl(mus, log_sigmas, masks)
    got = torch.autograd.grad(weighted, mus + log_sigmas)
    want = torch.autograd.grad(kl_layers(mus, log_sigmas, [1.0] * 3, LOW, HIGH), mus + log_sigmas)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_kl_gradient_scales_with_the_incoming_gradient():
    mus, log_sigmas, _ = _layers(torch.float64)
    kl = kl_layers(mus, log_sigmas, [0.5, 1.0, 2.0], LOW, HIGH)
    once = torch.autograd.grad(kl, mus[1], retain_graph=True)[0]
    thrice = torch.autograd.grad(3.0 * kl, mus[1])[0]
    torch.testing.assert_close(thrice, 3.0 * once)


def test_unservable_inputs_return_none(kernels):
    mus, log_sigmas, masks = _layers(torch.float32)
    deep = [m.detach().clone() for m in mus]
    deep[1][0] = 30.0  # its interval lies far below its mean (σ ≤ e²): the exact float64 path
    assert _fused(deep, log_sigmas, masks) is None
    mixed = [s.detach().double() for s in log_sigmas]
    assert _fused(mus, mixed, masks) is None  # μ and log σ in different dtypes
    half = [m.detach().half() for m in mus]
    assert _fused(half, [s.detach().half() for s in log_sigmas], masks) is None
    assert kl_layers(half, [s.detach().half() for s in log_sigmas], [1.0] * 3, LOW, HIGH) is None
    with kernels(False):
        assert _fused(mus, log_sigmas, masks) is None
        assert kl_layers(mus, log_sigmas, [1.0] * 3, LOW, HIGH) is None


def _stash_users(kl):
    """The autograd nodes the KL term is, or reaches in one or two steps (names)."""
    first = [f for f, _ in kl.grad_fn.next_functions if f is not None]
    return {kl.grad_fn.name()} | {f.name() for f in first} | {g.name() for f in first for g, _ in f.next_functions if g}


def test_kl_loss_reuses_the_kl_of_the_draw_only_while_it_is_valid():
    torch.manual_seed(0)
    net = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5),
                                          torch.nn.Tanh(), torch.nn.Linear(5, 3)))
    bank = net._bmrs_bank
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def fresh(**kw):  # the KL computed on its own, the draw's ignored
        stashes, bank.kl_stashes = bank.kl_stashes, []
        try:
            return bmrs.kl_loss(net, **kw)
        finally:
            bank.kl_stashes = stashes

    for reduction in ("mean", "elbo"):
        kw = dict(reduction=reduction, num_train=50 if reduction == "elbo" else None)
        ce = torch.nn.functional.cross_entropy(net(x), y)
        reused = bmrs.kl_loss(net, **kw)
        assert any("SampleLayersNode" in name for name in _stash_users(reused))
        torch.testing.assert_close(reused, fresh(**kw), rtol=1e-6, atol=0)
        params = list(net.parameters())
        want = torch.autograd.grad(ce + fresh(**kw), params, retain_graph=True)
        for got, ref in zip(torch.autograd.grad(ce + reused, params), want):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
        # that backward spent the draw's graph: the KL is computed afresh, and can be differentiated
        again = bmrs.kl_loss(net, **kw)
        assert not any("SampleLayersNode" in name for name in _stash_users(again))
        again.backward()

    net(x)
    with torch.no_grad():  # another grad mode: computed afresh, without a graph
        assert not bmrs.kl_loss(net).requires_grad
    assert any("SampleLayersNode" in name for name in _stash_users(bmrs.kl_loss(net)))
    with torch.no_grad():  # a parameter changed since the draw: the stashed KL is stale
        bmrs.noise_layers(net)[1][1].log_sigma.add_(0.25)
    after = bmrs.kl_loss(net)
    assert not any("SampleLayersNode" in name for name in _stash_users(after))
    torch.testing.assert_close(after, fresh(), rtol=0, atol=0)



def test_the_mean_kl_formed_by_the_draw_is_handed_out_once():
    # kl_loss returns the draw's own output tensor; a caller scaling it in place must not change what a
    # second call in the same step returns
    torch.manual_seed(0)
    net = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5),
                                          torch.nn.Tanh(), torch.nn.Linear(5, 3)))
    net(torch.randn(8, 4))
    first = bmrs.kl_loss(net)
    assert "SampleLayersNode" in first.grad_fn.name()
    value = first.item()
    first.mul_(0.5)
    second = bmrs.kl_loss(net)
    assert second is not first and second.item() == pytest.approx(value, rel=1e-6)
    assert any("SampleLayersNode" in name for name in _stash_users(second))  # still the draw's per-layer KL
    (first + second).backward()  # both differentiate through the one draw
    for _, noise in bmrs.noise_layers(net):
        assert noise.mu.grad is not None and bool(torch.isfinite(noise.mu.grad).all())


class _Blocks(torch.nn.Module):
    """Blocks in a ModuleList, run one after the other (ModuleList.insert registers without hooks)."""

    def __init__(self, *blocks):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _block(width=6):
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, width))


def _expected_mean_kl(model):
    return torch.stack([noise.kl().mean() for _, noise in bmrs.noise_layers(model)]).mean()


def test_kl_loss_follows_a_model_edited_by_hand_and_the_debug_check_names_the_edit():
    # the bank is an explicit registry (attach builds it); kl_loss walks the model at every call and puts what
    # it finds in the registry, so edits that no hook sees still give the right KL
    from bmrs.errors import ModelError
    from bmrs.nn.bank import check_registry

    torch.manual_seed(0)
    x = torch.randn(8, 6)

    def fresh():
        net, spare = bmrs.attach(_Blocks(_block(), _block(), torch.nn.Linear(6, 3))), bmrs.attach(_block())
        net(x)
        torch.testing.assert_close(bmrs.kl_loss(net), _expected_mean_kl(net), rtol=1e-6, atol=0)
        check_registry(net)
        return net, spare

    def edited(net):
        with pytest.raises(ModelError, match="noise bank lists"):
            check_registry(net)
        for _ in range(2):  # the step after the edit (the draw's stash is the old layers'), and the next
            net(x)
            torch.testing.assert_close(bmrs.kl_loss(net), _expected_mean_kl(net), rtol=1e-6, atol=0)
        check_registry(net)  # kl_loss put the walk in the registry

    net, spare = fresh()
    net.blocks.insert(1, spare)  # (ModuleList.insert writes the dict: no registration hook sees it)
    edited(net)
    net, _ = fresh()
    del net.blocks[0]
    edited(net)
    net, spare = fresh()
    net.spare = spare  # a noisy block that never runs: its KL still counts
    edited(net)


def test_kl_loss_walks_when_a_noise_layer_is_skipped_by_the_forward():
    torch.manual_seed(0)

    class Branches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = _block(), _block(), torch.nn.Linear(6, 3)
            self.use_b = True

        def forward(self, x):
            return self.head(self.b(x) if self.use_b else self.a(x))

    net = bmrs.attach(Branches())
    x = torch.randn(8, 6)
    net(x)
    bmrs.kl_loss(net)  # confirmed
    net.use_b = False  # b's noise layer is drawn for but not applied: its KL still counts, computed afresh
    net(x)
    torch.testing.assert_close(bmrs.kl_loss(net), _expected_mean_kl(net), rtol=1e-6, atol=0)


def test_a_copied_model_has_its_own_registry():
    import copy
    import pickle

    from bmrs.nn.bank import check_registry

    torch.manual_seed(0)
    net = bmrs.attach(_Blocks(_block(), torch.nn.Linear(6, 3)))
    x = torch.randn(8, 6)
    net(x)
    bmrs.kl_loss(net)
    for twin in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        check_registry(twin)  # the copy's bank lists the copy's layers
        assert not twin._bmrs_bank.kl_stashes  # and not the original's draw
        twin(x)
        torch.testing.assert_close(bmrs.kl_loss(twin), _expected_mean_kl(twin), rtol=1e-6, atol=0)
