"""Heads of torch's own nn.MultiheadAttention (and nn.Transformer* layers) as prunable structures."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

import bmrs
from bmrs.nn.mha import HeadedMultiheadAttention, make_headed

_CONFIGS = [dict(), dict(add_bias_kv=True), dict(add_zero_attn=True), dict(kdim=6, vdim=5), dict(bias=False)]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("config", _CONFIGS, ids=lambda c: ",".join(c) or "plain")
def test_headed_attention_computes_what_torch_does(batch_first, config):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, **config)
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 7, config.get("kdim", 8)), torch.randn(3, 7, config.get("vdim", 8))
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, -2:] = True
    calls = [dict(), dict(key_padding_mask=padding, attn_mask=torch.randn(4, 7)),
             dict(attn_mask=torch.rand(4, 7) > 0.7, key_padding_mask=padding), dict(average_attn_weights=False),
             dict(need_weights=False), dict(attn_mask=torch.randn(3 * 2, 4, 7))]
    with torch.no_grad():
        want = [mha(q, k, v, **call) for call in calls]
        make_headed(mha)
        got = [mha(q, k, v, **call) for call in calls]
    for (out, weights), (ref, ref_weights) in zip(got, want):
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        assert (weights is None) == (ref_weights is None)
        if weights is not None:
            torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)


def test_unbatched_inputs_and_gradients_match():
    torch.manual_seed(1)
    mha, x = nn.MultiheadAttention(8, 4), torch.randn(5, 8)
    want = mha(x, x, x)
    want[0].sum().backward()
    ref_grad = mha.in_proj_weight.grad.clone()
    mha.zero_grad()
    got = make_headed(mha)(x, x, x)
    got[0].sum().backward()
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mha.in_proj_weight.grad, ref_grad, atol=1e-6, rtol=1e-5)


def test_subclasses_with_their_own_forward_are_refused():
    class Custom(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    with pytest.raises(bmrs.ConfigError, match="own forward"):
        make_headed(Custom(8, 2))


def _encoder(seed: int = 0, layers: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, layers, enable_nested_tensor=False), nn.Flatten(),
                         nn.Linear(16 * 5, 3))


def _pruned_encoder() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = bmrs.attach(_encoder())
    layers = dict(bmrs.noise_layers(model))
    layers["0.layers.0.self_attn"].mask[[0, 2]] = 0
    layers["0.layers.0.linear1"].mask[:10] = 0
    x = torch.randn(6, 5, 16)
    with torch.no_grad():
        want = model.eval()(x)
    return model, x, want


def test_default_placement_gates_heads_and_ffn_units_not_the_stream():
    model = bmrs.attach(_encoder())
    layers = dict(bmrs.noise_layers(model))
    assert set(layers) == {f"0.layers.{i}.{part}" for i in (0, 1) for part in ("self_attn", "linear1")}
    assert layers["0.layers.0.self_attn"].num_features == 4 and layers["0.layers.0.self_attn"].head_dim == 4
    assert isinstance(model[0].layers[0].self_attn, HeadedMultiheadAttention)
    bmrs.detach_noise(model)
    assert type(model[0].layers[0].self_attn) is nn.MultiheadAttention  # back to torch's own class


def test_whole_heads_are_removed_and_the_masked_model_computed():
    model, x, want = _pruned_encoder()
    before = bmrs.count(bmrs.detach_noise(_encoder()), x)
    small = bmrs.compact(model, x)
    attn0, attn1 = small[0].layers[0].self_attn, small[0].layers[1].self_attn
    assert attn0.num_heads == 2 and attn0.q_proj_weight.shape == (8, 16) and attn0.out_proj.in_features == 8
    assert type(attn1) is nn.MultiheadAttention and attn1.num_heads == 4  # kept every head: torch's class again
    assert small[0].layers[0].linear1.out_features == 22
    with torch.no_grad():
        torch.testing.assert_close(small(x), want, atol=1e-5, rtol=1e-5)
    after = bmrs.count(small, x)
    assert after["params"] < before["params"] and after["macs"] < before["macs"]


def test_every_head_pruned_keeps_one_zero_head_and_explicit_targets_gate_heads():
    model = bmrs.attach(_encoder(layers=1), targets=["0.layers.0.self_attn"])
    (name, noise), = bmrs.noise_layers(model)
    assert noise.head_dim == 4
    noise.mask[:] = 0
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        want = model.eval()(x)
        small = bmrs.compact(model, x)
        torch.testing.assert_close(small(x), want, atol=1e-5, rtol=1e-5)
    assert small[0].layers[0].self_attn.num_heads == 1


@pytest.mark.slow
def test_compacted_encoder_reloads_in_a_fresh_process_and_exports(tmp_path, fresh_process, monkeypatch):
    module = tmp_path / "encoder_factory.py"
    module.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build():
            layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
            return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(),
                                 nn.Linear(16 * 5, 3))
    """))
    model, x, want = _pruned_encoder()
    small = bmrs.compact(model, x)
    path = tmp_path / "encoder.safetensors"
    bmrs.save(small, path)
    with torch.no_grad():
        want = small(x)
    fresh_process(f"sys.path.insert(0, {str(tmp_path)!r}); import bmrs, encoder_factory; "
                  f"m = bmrs.load({str(path)!r}, encoder_factory.build)", "m(x)", x, want, 1e-6)
    pt2 = tmp_path / "encoder.pt2"
    bmrs.export(small, x, pt2)
    fresh_process(f"m = torch.export.load({str(pt2)!r}).module()", "m(x)", x, want, 1e-5, without_bmrs=True)
