"""Encode speed, side by side in one run: embedkit vs sentence-transformers vs plain transformers vs llm2vec.

All systems encode the same first N unique STS-B test sentences with SmolLM2-135M, causal attention, mean pooling,
the same dtype and max_length 128. Reports sentences/s, real tokens/s, ratios, and model FLOPs utilisation
against a matmul of the model's own shapes in the run's dtype, measured just before and after each timed run.
Every system's vectors are checked against an unpadded reference (plain transformers, one text at a time).
``--dtype auto`` (default) is bfloat16 where the CPU runs it natively, else float32; the report names the CPU.
The machine is shared and its speed drifts, so systems are run in rounds (round-robin) and the median per
system is reported.

    .venv/bin/python bench/bench_encode.py                    # all systems (llm2vec if its venv exists)
    .venv/bin/python bench/bench_encode.py --no-llm2vec --rounds 1

llm2vec needs its own venv: ``bash bench/setup_llm2vec_env.sh`` (see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from embedkit import Embedder
from embedkit.backbone import resolve_dtype
from embedkit.datasets import find_data_dir, read_sts
from embedkit.hardware import describe_cpu

ROOT = Path(__file__).resolve().parent.parent
LLM2VEC_PY = Path(os.environ.get("LLM2VEC_VENV", "/work/llm2vec-venv")) / "bin" / "python"
REFERENCE_TEXTS = 200  # texts checked against the unpadded reference
LLM2VEC_MODEL = Path(os.environ.get("LLM2VEC_MODEL_DIR", "/work/cache/smollm2-135m-hf44"))


def sentences(n: int) -> list[str]:
    s1, s2, _ = read_sts(find_data_dir(), "test")
    return list(dict.fromkeys(s for pair in zip(s1, s2, strict=True) for s in pair))[:n]


def flops_per_token(config, avg_len: float) -> float:
    """Forward FLOPs per token: 2 x (linear weights) + attention scores and values (4 x L x d per layer)."""
    d, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    q = config.num_attention_heads * head_dim
    linear = d * q + 2 * d * kv + q * d + 3 * d * ff
    return layers * (2 * linear + 4 * avg_len * q)


def matmul_peak(config, dtype: torch.dtype, tokens: int = 4096, repeats: int = 20) -> float:
    """GFLOP/s of the model's own linear shapes at a large token count (the best this machine can do)."""
    d, ff = config.hidden_size, config.intermediate_size
    best = 0.0
    for k, n in ((d, ff), (ff, d), (d, d)):
        a = torch.randn(tokens, k, dtype=dtype)
        b = torch.randn(k, n, dtype=dtype)
        for _ in range(3):
            a @ b
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, repeats * 2 * tokens * k * n / (time.perf_counter() - start) / 1e9)
    return best


def run_embedkit(embedder: Embedder, texts: list[str], workers: int | None = None) -> np.ndarray:
    return embedder.encode(texts, normalize=False, workers=workers)


def run_sentence_transformers(model, texts: list[str], batch_size: int) -> np.ndarray:
    return model.encode(texts, batch_size=batch_size, normalize_embeddings=False, convert_to_numpy=True)


def run_plain(backbone, tokenizer, texts: list[str], batch_size: int) -> np.ndarray:
    """Plain transformers, input order (unsorted) batches, mean pooling."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=128,
                              return_tensors="pt")
            hidden = backbone(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1)).float().numpy())
    return np.concatenate(out)


def run_llm2vec(n: int, batch_size: int, dtype: str) -> dict | None:
    if not (LLM2VEC_PY.exists() and (LLM2VEC_MODEL / "config.json").exists()):
        print(f"llm2vec skipped: no peer venv at {LLM2VEC_PY} or model at {LLM2VEC_MODEL} "
              "(bash bench/setup_llm2vec_env.sh)", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "l2v.json"
        subprocess.run([str(LLM2VEC_PY), str(ROOT / "bench" / "llm2vec_peer.py"), "--model", str(LLM2VEC_MODEL),
                        "--n", str(n), "--batch-size", str(batch_size), "--dtype", dtype, "--json", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def timed(func, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = func(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-llm2vec", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd embedkit run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "encode_speed.json"))
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    args.dtype = str(resolve_dtype(args.dtype)).removeprefix("torch.")
    texts = sentences(args.n)
    embedder = Embedder.from_pretrained(args.model, dtype=args.dtype, max_length=128)
    tokenizer = embedder.tokenizer
    real_tokens = sum(len(ids) for ids in embedder.tokenize(texts).ids)
    config = embedder.backbone.config
    with tempfile.TemporaryDirectory() as tmp:
        embedder.save(Path(tmp) / "m")
        st = SentenceTransformer(str(Path(tmp) / "m"), model_kwargs={"dtype": getattr(torch, args.dtype)})
    st.max_seq_length = 128

    systems = {
        "embedkit": lambda: run_embedkit(embedder, texts),
        "embedkit, 1 worker": lambda: run_embedkit(embedder, texts, workers=1),
        "sentence-transformers": lambda: run_sentence_transformers(st, texts, args.batch_size),
        "transformers (unsorted)": lambda: run_plain(embedder.backbone, tokenizer, texts, args.batch_size),
    }
    if not args.no_compile:  # a second embedder: compile_layers() works in place
        compiled = Embedder.from_pretrained(args.model, dtype=args.dtype, max_length=128).compile_layers()
        start = time.perf_counter()
        run_embedkit(compiled, texts)  # compiles: every batch shape of the timed runs is seen here
        print(f"compile warm-up {time.perf_counter() - start:.0f} s", flush=True)
        systems["embedkit, compiled layers"] = lambda: run_embedkit(compiled, texts)
    run_embedkit(embedder, texts[:64])  # warm-up (allocator, kernels)
    run_sentence_transformers(st, texts[:64], args.batch_size)
    # The host's speed drifts within minutes, so every timed run is bracketed by two peak measurements and its
    # MFU is taken against their mean: a run and its peak see the same machine.
    dtype = getattr(torch, args.dtype)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in systems}  # (seconds, peak GFLOP/s)
    vectors: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name, func in systems.items():
            before = matmul_peak(config, dtype)
            seconds, vectors[name] = timed(func)
            runs[name].append((seconds, (before + matmul_peak(config, dtype)) / 2))
        if not args.no_llm2vec:
            before = matmul_peak(config, dtype)
            result = run_llm2vec(args.n, args.batch_size, args.dtype)
            if result:
                runs.setdefault("llm2vec 0.2.3", []).append(
                    (result["seconds"], (before + matmul_peak(config, dtype)) / 2))
    per_token = flops_per_token(config, real_tokens / len(texts))
    peak = statistics.median(p for pairs in runs.values() for _, p in pairs)
    rows = {}
    for name, pairs in runs.items():
        seconds = statistics.median(s for s, _ in pairs)
        rows[name] = {"seconds": seconds, "sentences_per_s": len(texts) / seconds,
                      "tokens_per_s": real_tokens / seconds,
                      "mfu": statistics.median(real_tokens * per_token / s / 1e9 / p for s, p in pairs),
                      "mfu_vs_median_peak": real_tokens * per_token / seconds / 1e9 / peak,
                      "runs": [{"seconds": round(s, 3), "peak_gflops": round(p)} for s, p in pairs]}
    fastest_peer = max(v["sentences_per_s"] for k, v in rows.items() if not k.startswith("embedkit"))
    ref = vectors["sentence-transformers"]
    got = vectors["embedkit"]
    cosine = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    unpadded = run_plain(embedder.backbone, tokenizer, texts[:REFERENCE_TEXTS], 1)  # batch 1: no padding at all
    for name, row in rows.items():
        if name in vectors:
            row["min_cosine_vs_unpadded"] = min_cosine(vectors[name][:REFERENCE_TEXTS], unpadded)
    report = {
        "model": args.model, "n": len(texts), "avg_tokens": real_tokens / len(texts), "dtype": args.dtype,
        "batch_size_peers": args.batch_size,
        "embedkit_workers": embedder.default_workers(), "rounds": args.rounds, "threads": torch.get_num_threads(),
        "matmul_gflops_median": peak, "flops_per_token": per_token, "systems": rows,
        "embedkit_vs_fastest_peer": rows["embedkit"]["sentences_per_s"] / fastest_peer,
        "embedkit_vs_sentence_transformers_min_cosine": float(cosine.min()),
        "machine": describe_cpu(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{len(texts)} sentences, {report['avg_tokens']:.1f} tokens each, {args.dtype}, "
          f"matmul peak {peak:.0f} GFLOP/s")
    print(f"CPU: {report['machine']['cpu']} ({report['machine']['isa']}), {torch.get_num_threads()} threads")
    print(f"{'system':<26}{'sent/s':>9}{'tok/s':>9}{'MFU':>7}{'(median peak)':>14}{'ratio':>8}{'cos/unpadded':>13}")
    base = rows["embedkit"]["sentences_per_s"]
    for name, row in rows.items():
        print(f"{name:<26}{row['sentences_per_s']:>9.1f}{row['tokens_per_s']:>9.0f}{100 * row['mfu']:>6.1f}%"
              f"{100 * row['mfu_vs_median_peak']:>13.1f}%{base / row['sentences_per_s']:>7.2f}x"
              f"{row.get('min_cosine_vs_unpadded', float('nan')):>13.5f}")
    print(f"embedkit vs fastest peer: {report['embedkit_vs_fastest_peer']:.2f}x; min cosine vs "
          f"sentence-transformers {cosine.min():.5f}; written to {out}")


if __name__ == "__main__":
    main()
