"""Packed against padded forwards: a server's merged batches of random texts, and an offline corpus encode.

Server-like: random batches of N TinyStories sentences (as 32 one-text clients merge into), each run through
``Embedder.encode_tokenized`` as ``embedkit serve``'s ``ModelCall`` runs it, padded (256-token forwards) or
packed (``--row-tokens`` per row, ``--packed-budget`` real tokens per forward). Offline: ``Embedder.encode`` of
``--corpus`` sentences, padded and packed (best of two each). Prints one JSON line per figure, with the CPU.

    .venv/bin/python bench/bench_packing.py                      # SmolLM2-135M, bf16
    .venv/bin/python bench/bench_packing.py --sizes 16 32 --row-tokens 64 128 256 --packed-budget 256 512
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time

from embedkit import packing
from embedkit.datasets import find_data_dir
from embedkit.embedder import open_model
from embedkit.hardware import apply_thread_policy, describe_cpu
from embedkit.serving.model_call import ModelCall


def rate(run, texts: int, repeats: int = 1) -> float:
    """Texts/s of ``run`` (best of ``repeats``)."""
    best = 0.0
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        best = max(best, texts / (time.perf_counter() - began))
    return best


def merged_batches(embedder, texts: list[str], size: int, count: int, seed: int = 0):
    """``count`` random batches of ``size`` texts, tokenized as the server tokenizes them."""
    pick = random.Random(seed)
    return [embedder.tokenize(pick.sample(texts, size)) for _ in range(count)]


def server_figures(embedder, texts, args) -> list[dict]:
    rows = []
    for size in args.sizes:
        batches = merged_batches(embedder, texts, size, args.batches)
        real = sum(len(s) for b in batches for s in b.ids)
        padded = ModelCall(embedder, 256, embedder.default_workers())
        for b in batches[:3]:
            padded(b)  # warm-up
        rows.append({"case": "server", "texts": size, "forward": "padded 256",
                     "texts_per_s": rate(lambda batches=batches, padded=padded: [padded(b) for b in batches],
                                             size * len(batches), 2),
                     "real_tokens_per_text": round(real / size / len(batches), 1)})
        for budget, row_tokens, workers in itertools.product(args.packed_budget, args.row_tokens, args.workers):
            packing.DEFAULT_ROW_TOKENS = row_tokens
            call = ModelCall(embedder, budget, embedder.default_workers())

            def run(call=call, workers=workers, batches=batches):
                for b in batches:
                    embedder.encode_tokenized(b, max_batch_tokens=call.max_batch_tokens, show_progress_bar=False,
                                              workers=workers or call.workers_for(b), packed=True)

            run()
            rows.append({"case": "server", "texts": size, "forward": f"packed {budget}/{row_tokens} w{workers}",
                         "texts_per_s": rate(run, size * len(batches), 2)})
    return rows


def offline_figures(embedder, texts, args) -> list[dict]:
    corpus = texts[:args.corpus]
    embedder.encode(corpus[:64])
    rows = [{"case": "offline", "texts": len(corpus), "forward": "padded",
             "texts_per_s": rate(lambda: embedder.encode(corpus), len(corpus), 2)}]
    for row_tokens in args.row_tokens:
        packing.DEFAULT_ROW_TOKENS = row_tokens
        rows.append({"case": "offline", "texts": len(corpus), "forward": f"packed 2048/{row_tokens}",
                     "texts_per_s": rate(lambda: embedder.encode_tokenized(embedder.tokenize(corpus), packed=True),
                                         len(corpus), 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--batches", type=int, default=40, help="random batches per size")
    parser.add_argument("--row-tokens", type=int, nargs="+", default=[128])
    parser.add_argument("--packed-budget", type=int, nargs="+", default=[512])
    parser.add_argument("--workers", type=int, nargs="+", default=[0], help="packed workers (0: ModelCall's rule)")
    parser.add_argument("--corpus", type=int, default=4000, help="sentences of the offline encode (0: skip)")
    args = parser.parse_args()
    apply_thread_policy()
    path = find_data_dir() / "unlabeled" / "TinyStories" / "sentences.txt"
    texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:20_000]
    embedder = open_model(args.model, max_length=args.max_length)
    machine = describe_cpu()
    rows = server_figures(embedder, texts, args) + (offline_figures(embedder, texts, args) if args.corpus else [])
    for row in rows:
        row["texts_per_s"] = round(row["texts_per_s"], 1)
        print(json.dumps({**row, "model": args.model, "machine": machine}))


if __name__ == "__main__":
    main()
