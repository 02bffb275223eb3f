"""Throughput and latency of ``embedkit serve`` under load, against offline ``Embedder.encode`` on the same texts.

Starts ``embedkit serve MODEL`` on a free 127.0.0.1 port (a subprocess), waits until /health answers 200, then
runs N concurrent clients that each send one-text requests back to back for S seconds (after a short warm-up),
and stops the server. It then encodes the texts the clients sent, offline, in this process, with the same
settings. Reports served texts/s as a share of offline texts/s (dynamic batching is what closes the gap),
p50/p99 request latency, and the CPU (``describe_cpu``). The load generator is bounded (S seconds, a timeout
per request) and only ever talks to 127.0.0.1. Clients and server share the machine's cores: on a small
machine the load generator's own CPU use lowers the served figure.

    .venv/bin/python bench/bench_serve.py                                   # 32 clients, 60 s, SmolLM2-135M
    .venv/bin/python bench/bench_serve.py --clients 1                       # the latency floor
    .venv/bin/python bench/bench_serve.py --model ../shared/models/stories260K --seconds 10   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2
import numpy as np

from embedkit.datasets import find_data_dir
from embedkit.embedder import open_model
from embedkit.hardware import apply_thread_policy, describe_cpu

ROOT = Path(__file__).resolve().parent.parent
REQUEST_TIMEOUT = 60.0
READY_TIMEOUT = 600.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args, port: int, log) -> subprocess.Popen:
    """The server, its log (one access line per request) to a file: a pipe nobody reads would fill and block it."""
    command = [sys.executable, "-m", "embedkit", "serve", args.model, "--host", "127.0.0.1", "--port", str(port),
               "--model-name", "bench", "--dtype", args.dtype, "--max-length", str(args.max_length),
               "--max-wait-ms", str(args.max_wait_ms)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EMBEDKIT_API_KEY", None)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)


def wait_ready(url: str, server: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"embedkit serve exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx2.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"embedkit serve was not ready after {READY_TIMEOUT:.0f} s")


async def load(url: str, texts: list[str], clients: int, warmup: float,
               seconds: float) -> tuple[list[float], list[int]]:
    """Latencies (s) and text positions of the requests that finished inside the measured window."""
    positions = itertools.cycle(range(len(texts)))
    latencies: list[float] = []
    sent: list[int] = []
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def client(http: httpx2.AsyncClient) -> None:
        while (began := time.perf_counter()) < stop_at:
            position = next(positions)
            response = await http.post(url + "/v1/embeddings", json={"input": texts[position], "model": "bench"})
            response.raise_for_status()
            if began >= measure_from and (ended := time.perf_counter()) <= stop_at:
                latencies.append(ended - began)
                sent.append(position)

    limits = httpx2.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx2.AsyncClient(timeout=REQUEST_TIMEOUT, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return latencies, sent


def offline_rate(args, texts: list[str]) -> float:
    """Texts/s of ``Embedder.encode`` on these texts with the server's settings (best of two runs)."""
    apply_thread_policy()
    embedder = open_model(args.model, dtype=args.dtype, max_length=args.max_length)
    embedder.encode(texts[:64])  # warm-up
    best = 0.0
    for _ in range(2):
        began = time.perf_counter()
        embedder.encode(texts)
        best = max(best, len(texts) / (time.perf_counter() - began))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window (at most 600)")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--texts", default=None, help="one text per line (default: TinyStories sentences)")
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    args = parser.parse_args()
    if not (1 <= args.clients <= 256 and 0 < args.seconds <= 600):
        parser.error("--clients must be 1..256 and --seconds 0..600: this is a bounded benchmark.")
    path = Path(args.texts) if args.texts else find_data_dir() / "unlabeled" / "TinyStories" / "sentences.txt"
    texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:20_000]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as folder, open(Path(folder) / "serve.log", "w") as log:
        server = start_server(args, port, log)
        try:
            wait_ready(url, server, Path(folder) / "serve.log")
            latencies, sent = asyncio.run(load(url, texts, args.clients, args.warmup, args.seconds))
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    served = len(sent) / args.seconds
    offline = offline_rate(args, [texts[p] for p in sent[:5000]] or texts[:1000])
    ms = np.array(latencies) * 1000
    report = {
        "model": args.model, "clients": args.clients, "seconds": args.seconds, "max_length": args.max_length,
        "dtype": args.dtype, "max_wait_ms": args.max_wait_ms, "requests": len(sent),
        "served_texts_per_s": round(served, 1), "offline_texts_per_s": round(offline, 1),
        "served_share_of_offline": round(served / offline, 3),
        "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 2), "p99": round(float(np.percentile(ms, 99)), 2)}
        if len(ms) else None,
        "machine": describe_cpu(),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
