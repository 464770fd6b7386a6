"""Attention heads as prunable structures: bmrs's ViT, transformers' BERT and ViT."""

from __future__ import annotations

import torch
import transformers  # noqa: F401 (the test extra installs it)

import bmrs
from bmrs.models import vit


def _prune_heads(model, plan):
    layers = dict(bmrs.noise_layers(model))
    for name, heads in plan.items():
        assert layers[name].head_dim is not None, name
        layers[name].mask[heads] = 0
    return model.eval()


def _close(small, model, inputs, field=None):
    with torch.no_grad():
        got, want = (small(**inputs), model(**inputs)) if isinstance(inputs, dict) else (small(inputs), model(inputs))
    if field:
        got, want = getattr(got, field), getattr(want, field)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_builtin_vit_loses_whole_heads_and_computes_the_masked_model():
    torch.manual_seed(0)
    model = _prune_heads(vit(depth=2, dim=48, heads=4, mlp_dim=64), {"blocks.0.attn": [0, 2], "blocks.1.attn": [3]})
    x = torch.randn(3, 3, 32, 32)
    small = bmrs.compact(model, x)
    assert [b.attn.num_heads for b in small.blocks] == [2, 3]
    assert small.blocks[0].attn.qkv.out_features == 3 * 2 * 12 and small.blocks[0].attn.proj.in_features == 24
    assert small.blocks[1].attn.proj.out_features == 48  # the residual stream keeps its width
    _close(small, model, x)
    report = bmrs.prune(model, bmrs.criteria.SNR(threshold=-1.0))  # heads count as structures
    assert report.structures == 4 + 64 + 4 + 64 and report.pruned == 3


def test_a_training_step_reaches_the_head_gates():
    model = vit(depth=1, dim=32, heads=4, mlp_dim=32).train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    gate = dict(bmrs.noise_layers(model))["blocks.0.attn"]
    assert gate.mu.grad is not None and bool((gate.mu.grad != 0).all())


def test_bert_heads_and_ffn_units_by_default():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                        vocab_size=100, num_labels=3)
    model = bmrs.attach(BertForSequenceClassification(config))
    # heads and FFN units; nothing on the residual stream, the pooler or the classifier
    assert [(n, l.num_features) for n, l in bmrs.noise_layers(model)] == [
        ("bert.encoder.layer.0.attention", 4), ("bert.encoder.layer.0.intermediate.dense", 96),
        ("bert.encoder.layer.1.attention", 4), ("bert.encoder.layer.1.intermediate.dense", 96)]
    _prune_heads(model, {"bert.encoder.layer.0.attention": [1, 3], "bert.encoder.layer.1.attention": [0, 1, 2]})
    dict(bmrs.noise_layers(model))["bert.encoder.layer.1.intermediate.dense"].mask[:50] = 0
    inputs = {"input_ids": torch.randint(0, 100, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    small = bmrs.compact(model, inputs)
    layer0, layer1 = small.bert.encoder.layer
    assert (layer0.attention.self.num_attention_heads, layer0.attention.self.all_head_size) == (2, 32)
    assert layer1.attention.self.query.out_features == 16 and layer1.attention.output.dense.in_features == 16
    assert layer1.intermediate.dense.out_features == 46
    _close(small, model, inputs, "logits")


def test_transformers_vit_heads(tmp_path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                       image_size=32, patch_size=8)
    model = bmrs.attach(ViTModel(config))
    gates = [n for n, l in bmrs.noise_layers(model) if l.head_dim is not None]
    assert len(gates) == 2
    _prune_heads(model, {gates[1]: [0, 1, 2]})
    x = torch.randn(2, 3, 32, 32)
    small = bmrs.compact(model, x)
    attention = small.get_submodule(gates[1])
    assert attention.q_proj.out_features == 16 and attention.o_proj.in_features == 16
    _close(small, model, x, "last_hidden_state")
    bmrs.save(small, tmp_path / "vit.safetensors")  # reloads into the same class, heads and all
    again = bmrs.load(tmp_path / "vit.safetensors", lambda: ViTModel(config))
    _close(again, small, x, "last_hidden_state")
