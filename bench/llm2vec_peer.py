"""Peer side of the speed benchmark: STS-B sentences through llm2vec 0.2.3 (run with the peer venv's python).

Set up the venv and the model folder with ``bash bench/setup_llm2vec_env.sh``, then::

    /work/llm2vec-venv/bin/python bench/llm2vec_peer.py --model /work/cache/smollm2-135m-hf44 \
        --n 1000 --batch-size 64 --dtype bfloat16 --json OUT.json [--save-embeddings OUT.npy]
    /work/llm2vec-venv/bin/python bench/llm2vec_peer.py --model DIR --sts --json OUT.json

Speed mode times ``l2v.encode`` on the first N unique STS-B test sentences after one warm-up batch; ``--sts``
reports STS-B test Spearman (cosine of L2-normalised vectors, x100) instead. Causal attention, mean pooling.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:  # newer peft releases expect this submodule to be imported already
    import torch.distributed.tensor  # noqa: F401
except ImportError:
    pass

import transformers  # noqa: E402
from llm2vec import LLM2Vec  # noqa: E402

SYSTEM = "llm2vec 0.2.3"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/sts/STSBenchmark/test.jsonl"
DEFAULT_MODEL = os.environ.get("LLM2VEC_MODEL_DIR", "/work/cache/smollm2-135m-hf44")


def read_pairs(path: Path) -> list[tuple[str, str, float]]:
    """STS-B rows as (sentence1, sentence2, score), in file order."""
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(r["sentence1"], r["sentence2"], float(r["score"])) for r in rows]


def unique_sentences(pairs: list[tuple[str, str, float]], n: int | None = None) -> list[str]:
    """sentence1 then sentence2 of each row, deduplicated in order, first n."""
    out = list(dict.fromkeys(s for a, b, _ in pairs for s in (a, b)))
    return out if n is None else out[:n]


def load(model_dir: str, dtype: str, max_length: int) -> LLM2Vec:
    """LLM2Vec with causal attention and mean pooling."""
    return LLM2Vec.from_pretrained(
        model_dir,
        enable_bidirectional=False,
        pooling_mode="mean",
        max_length=max_length,
        torch_dtype=getattr(torch, dtype),
    )


def encode(l2v: LLM2Vec, sentences: list[str], batch_size: int) -> np.ndarray:
    """Float32 embeddings, one row per sentence."""
    emb = l2v.encode(sentences, batch_size=batch_size, show_progress_bar=False)
    return emb.float().numpy()


def count_tokens(l2v: LLM2Vec, sentences: list[str], max_length: int) -> int:
    """Total tokens the model sees, without padding."""
    enc = l2v.tokenizer(sentences, truncation=True, max_length=max_length)
    return sum(len(ids) for ids in enc["input_ids"])


def spearman_sts(l2v: LLM2Vec, pairs: list[tuple[str, str, float]], batch_size: int) -> float:
    """STS Spearman x100 of cosine similarities (vectors L2-normalised)."""
    from scipy.stats import spearmanr

    sents = unique_sentences(pairs)
    emb = encode(l2v, sents, batch_size)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-12)
    index = {s: i for i, s in enumerate(sents)}
    cos = [float(emb[index[a]] @ emb[index[b]]) for a, b, _ in pairs]
    return float(spearmanr(cos, [s for _, _, s in pairs]).statistic) * 100


def native_cpu_dtype() -> str:
    """embedkit.hardware's rule, repeated here: this script runs in llm2vec's own venv, without embedkit."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "float32"


def main(argv: list[str] | None = None) -> int:
    """Run the speed benchmark (default) or the STS-B evaluation, print and write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="transformers-4.44 HF folder (setup script)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="STS-B test.jsonl")
    p.add_argument("--n", type=int, default=1000, help="number of unique sentences to time")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                   help="auto: bfloat16 where the CPU runs it natively (AMX / AVX512-BF16), else float32")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--save-embeddings", type=Path, help="save the timed vectors (float32 .npy)")
    p.add_argument("--sts", action="store_true", help="report STS-B test Spearman instead of timing")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.dtype == "auto":
        args.dtype = native_cpu_dtype()
    pairs = read_pairs(args.data)
    l2v = load(args.model, args.dtype, args.max_length)
    result: dict[str, object] = {
        "system": SYSTEM,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "isa": torch.backends.cpu.get_cpu_capability(),
    }
    if args.sts:
        t0 = time.perf_counter()
        rho = spearman_sts(l2v, pairs, args.batch_size)
        result.update(task="stsb-test", pairs=len(pairs), spearman=round(rho, 2))
        result["seconds"] = round(time.perf_counter() - t0, 3)
    else:
        sentences = unique_sentences(pairs, args.n)
        encode(l2v, sentences[: args.batch_size], args.batch_size)  # warm-up
        t0 = time.perf_counter()
        emb = encode(l2v, sentences, args.batch_size)
        seconds = time.perf_counter() - t0
        tokens = count_tokens(l2v, sentences, args.max_length)
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        result.update(
            n=len(sentences),
            seconds=round(seconds, 3),
            sentences_per_s=round(len(sentences) / seconds, 2),
            tokens=tokens,
            tokens_per_s=round(tokens / seconds, 1),
            embeddings_sha=hashlib.sha256(emb.tobytes()).hexdigest(),
            dim=int(emb.shape[1]),
        )
        if args.save_embeddings:
            args.save_embeddings.parent.mkdir(parents=True, exist_ok=True)
            np.save(args.save_embeddings, emb)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
