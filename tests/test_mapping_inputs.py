"""Example inputs given as a mapping (a tokenizer's BatchEncoding is a UserDict): compact, fold, count."""

from __future__ import annotations

from collections import UserDict

import torch
from torch import nn

import bmrs
from bmrs.compaction import count, fold_noise


class KeywordNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.act, self.out = nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2)

    def forward(self, input_ids=None, attention_mask=None):
        return self.out(self.act(self.inner(input_ids))) * attention_mask[:, None]


def test_mapping_inputs_compact_fold_and_count_per_example():
    torch.manual_seed(0)
    model = bmrs.attach(KeywordNet()).eval()
    bmrs.noise_layers(model)[0][1].mask[:5] = 0
    encoding = UserDict(input_ids=torch.randn(6, 10), attention_mask=torch.ones(6))
    small = bmrs.compact(model, encoding)
    assert small.inner.out_features == 3
    with torch.no_grad():
        torch.testing.assert_close(small(**encoding), model(**encoding), rtol=1e-5, atol=1e-6)
    folded = fold_noise(model, encoding)
    assert not bmrs.noise_layers(folded)
    # MACs per example, whatever the batch and however the inputs are passed
    per_example = count(KeywordNet(), {"input_ids": torch.randn(1, 10), "attention_mask": torch.ones(1)})["macs"]
    assert count(KeywordNet(), encoding)["macs"] <= per_example
    assert count(KeywordNet(), encoding)["macs"] >= 0.9 * per_example  # it was 6 times too many
