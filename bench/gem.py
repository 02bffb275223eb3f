"""GEM on SmolLM2-135M: generation check (WikiText2 perplexity, before and after) and STS-B of the embedding.

    .venv/bin/python bench/gem.py ppl smollm2-135m                 # the base model's perplexity
    .venv/bin/python -m embedkit train recipes/gem-smollm2-135m.yaml
    .venv/bin/python bench/gem.py ppl runs/gem-smollm2-135m/final  # after GEM (same sentences)
    .venv/bin/python bench/gem.py sts runs/gem-smollm2-135m/final  # STS-B test of the GEM embedding

Perplexity is on the last ``--n`` WikiText2 sentences of ../shared/data (the GEM recipe trains on SNLI texts,
so none of them is seen in training). Results are appended to bench/results/gem.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from embedkit.backbone import load_backbone
from embedkit.datasets import find_data_dir

RESULTS = Path(__file__).resolve().parent / "results" / "gem.jsonl"


def record(row: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def wikitext_sentences(data_dir: Path, n: int) -> list[str]:
    lines = (data_dir / "unlabeled" / "WikiText2" / "sentences.txt").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()][-n:]


def ppl(args) -> None:
    from embedkit.methods.gem import perplexity  # noqa: PLC0415

    model, tokenizer = load_backbone(args.model, dtype=args.dtype, with_lm_head=True)
    texts = wikitext_sentences(find_data_dir(args.data), args.n)
    start = time.perf_counter()
    value = perplexity(model, tokenizer, texts, max_length=args.max_length)
    record({"measure": "wikitext2_perplexity", "model": args.model, "sentences": len(texts),
            "max_length": args.max_length, "dtype": args.dtype, "perplexity": value,
            "seconds": time.perf_counter() - start})


def sts(args) -> None:
    from embedkit import Embedder  # noqa: PLC0415
    from embedkit.evaluation.sts import sts_spearman  # noqa: PLC0415

    embedder = Embedder.load(args.model)
    embedder.config.max_length = 128
    data = find_data_dir(args.data)
    start = time.perf_counter()
    score = sts_spearman(embedder, data, args.split)
    record({"measure": f"sts_{args.split}", "model": args.model, "spearman": score,
            "methods": embedder.config.methods, "seconds": time.perf_counter() - start})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["ppl", "sts"])
    parser.add_argument("model")
    parser.add_argument("--data", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--split", default="test")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ppl(args) if args.what == "ppl" else sts(args)


if __name__ == "__main__":
    main()
