"""Throughput and latency of ``embedkit serve`` under load, against offline ``Embedder.encode`` on the same texts.

Starts ``embedkit serve MODEL`` on a free 127.0.0.1 port (a subprocess), waits until /health answers 200, then
runs N concurrent clients that each send one-text requests back to back for S seconds (after a short warm-up), in
``--rounds`` windows; after each window this process encodes the texts sent in it offline with the same settings,
with the model's attention as loaded and with eager attention (what the server's packed forwards use on CPU), so
a drift of the host's speed hits both sides alike. Reports served texts/s as a share of the faster offline
texts/s (averaged over the rounds; dynamic batching is what closes the gap),
p50/p99 request latency, the CPU cores the load generator and the server used over the window, and the CPU
(``describe_cpu``). The load generator is one asyncio process with a keep-alive connection per client (see
``RawClient``: cheap per request, since it shares the cores with the server), bounded (S seconds, a timeout per
request) and only ever talks to 127.0.0.1.

    .venv/bin/python bench/bench_serve.py                                   # 32 clients, 60 s, SmolLM2-135M
    .venv/bin/python bench/bench_serve.py --encoding-format base64          # OpenAI clients' default format
    .venv/bin/python bench/bench_serve.py --clients 1 --seconds 20          # the latency floor
    .venv/bin/python bench/bench_serve.py --model ../shared/models/stories260K --seconds 10   # a smoke run
    .venv/bin/python bench/bench_serve.py -- --max-wait-ms 2                # more `embedkit serve` options
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
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
CHECK_EVERY = 50  # responses decoded and checked (all are status-checked)
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
READY_TIMEOUT = 600.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args, port: int, log) -> subprocess.Popen:
    """The server, its log (one access line per request) to a file: a pipe nobody reads would fill and block it."""
    command = [sys.executable, "-m", "embedkit", "serve", args.model, "--host", "127.0.0.1", "--port", str(port),
               "--model-name", "bench", "--dtype", args.dtype, "--max-length", str(args.max_length),
               *args.serve_options]
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


class RawClient:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1 with requests prepared as bytes.

    The load generator shares the machine's cores with the server, so what it spends per request is taken from
    the model. A general HTTP client (httpx) costs about as much CPU per request as the server's own handling;
    this one writes a ready-made request and reads the status line, headers and Content-Length body, nothing
    more. Every response's status is checked; one in ``CHECK_EVERY`` is decoded and its vector's length checked.
    """

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def post(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = CONTENT_LENGTH.search(head)
        if length is None:
            raise RuntimeError(f"a response without Content-Length: {head[:200]!r}")
        return status, await self.reader.readexactly(int(length.group(1)))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()


def request_bytes(port: int, text: str, encoding_format: str) -> bytes:
    body = json.dumps({"input": text, "model": "bench", "encoding_format": encoding_format}).encode()
    return (f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def check_vector(payload: bytes, encoding_format: str, width: int | None) -> int:
    """The vector's width; raises if a response does not hold one vector of the expected width."""
    item = json.loads(payload)["data"]
    vector = item[0]["embedding"]
    size = len(base64.b64decode(vector)) // 4 if encoding_format == "base64" else len(vector)
    if len(item) != 1 or (width is not None and size != width):
        raise RuntimeError(f"a response with {len(item)} vectors of width {size}, expected 1 of {width}")
    return size


async def load(port: int, texts: list[str], clients: int, warmup: float, seconds: float,
               encoding_format: str = "float", server_pid: int | None = None) -> dict:
    """Latencies (s) and text positions of the requests that finished inside the measured window, and the CPU
    seconds this load generator (and the server, given its pid) used during it."""
    positions = itertools.cycle(range(len(texts)))
    requests = [request_bytes(port, text, encoding_format) for text in texts]
    latencies: list[float] = []
    sent: list[int] = []
    width: list[int] = []
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds
    cpu: dict[str, float] = {}
    done = itertools.count()

    async def client() -> None:
        connection = RawClient(port)
        await connection.connect()
        try:
            while (began := time.perf_counter()) < stop_at:
                position = next(positions)
                status, payload = await asyncio.wait_for(connection.post(requests[position]), REQUEST_TIMEOUT)
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {payload[:300]!r}")
                if next(done) % CHECK_EVERY == 0:
                    width[:] = [check_vector(payload, encoding_format, width[0] if width else None)]
                if began >= measure_from and (ended := time.perf_counter()) <= stop_at:
                    latencies.append(ended - began)
                    sent.append(position)
        finally:
            await connection.close()

    async def clock() -> None:  # this process's CPU time over the measured window
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        cpu["start"] = time.process_time()
        cpu["server_start"] = process_cpu_seconds(server_pid) if server_pid else 0.0
        await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
        cpu["end"] = time.process_time()
        cpu["server_end"] = process_cpu_seconds(server_pid) if server_pid else 0.0

    await asyncio.gather(clock(), *(client() for _ in range(clients)))
    return {"latencies": latencies, "sent": sent, "client_cpu_seconds": cpu["end"] - cpu["start"],
            "server_cpu_seconds": cpu["server_end"] - cpu["server_start"]}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def offline_embedders(args) -> dict[str, object]:
    """The offline references, loaded once: the model as loaded, and with eager attention (what the server's
    packed forwards use on CPU; padded forwards may gain from it too)."""
    apply_thread_policy()
    embedders = {"as_loaded": open_model(args.model, dtype=args.dtype, max_length=args.max_length)}
    eager = open_model(args.model, dtype=args.dtype, max_length=args.max_length)
    if eager.use_eager_attention():
        embedders["eager_attention"] = eager
    for embedder in embedders.values():
        embedder.encode(["a warm-up text"] * 64)
    return embedders


def offline_rates(embedders: dict[str, object], texts: list[str]) -> dict[str, float]:
    """Texts/s of each reference's ``Embedder.encode`` on these texts (default settings, one run each)."""
    rates = {}
    for name, embedder in embedders.items():
        began = time.perf_counter()
        embedder.encode(texts)
        rates[name] = round(len(texts) / (time.perf_counter() - began), 1)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window (at most 600)")
    parser.add_argument("--rounds", type=int, default=3, help="load windows, each followed by an offline run")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--encoding-format", choices=["float", "base64"], default="float")
    parser.add_argument("--texts", default=None, help="one text per line (default: TinyStories sentences)")
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    parser.add_argument("serve_options", nargs="*", help="more `embedkit serve` options, after --")
    args = parser.parse_args()
    if not (1 <= args.clients <= 256 and 0 < args.seconds <= 600 and 1 <= args.rounds <= 10):
        parser.error("--clients must be 1..256, --seconds 0..600 and --rounds 1..10: this is a bounded benchmark.")
    path = Path(args.texts) if args.texts else find_data_dir() / "unlabeled" / "TinyStories" / "sentences.txt"
    texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:20_000]

    embedders = offline_embedders(args)
    window = args.seconds / args.rounds
    port = free_port()
    runs, offline_by_round = [], []
    with tempfile.TemporaryDirectory() as folder, open(Path(folder) / "serve.log", "w") as log:
        server = start_server(args, port, log)
        try:
            wait_ready(f"http://127.0.0.1:{port}", server, Path(folder) / "serve.log")
            for round_ in range(args.rounds):  # load, then offline, in turns: the host's drift hits both alike
                runs.append(asyncio.run(load(port, texts, args.clients, args.warmup if round_ == 0 else 1.0,
                                             window, args.encoding_format, server.pid)))
                sent = runs[-1]["sent"]
                offline_by_round.append(offline_rates(embedders, [texts[p] for p in sent[:5000]] or texts[:1000]))
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    requests = sum(len(run["sent"]) for run in runs)
    served = requests / args.seconds
    by_attention = {name: round(float(np.mean([rates[name] for rates in offline_by_round])), 1)
                    for name in offline_by_round[0]}
    offline = max(by_attention.values())  # the share is taken against the faster offline encode
    ms = np.array([latency for run in runs for latency in run["latencies"]]) * 1000
    report = {
        "model": args.model, "clients": args.clients, "seconds": args.seconds, "rounds": args.rounds,
        "max_length": args.max_length, "dtype": args.dtype, "encoding_format": args.encoding_format,
        "serve_options": args.serve_options, "requests": requests, "served_texts_per_s": round(served, 1),
        "offline_texts_per_s": round(offline, 1), "offline_texts_per_s_by_attention": by_attention,
        "served_share_of_offline": round(served / offline, 3),
        "served_texts_per_s_by_round": [round(len(run["sent"]) / window, 1) for run in runs],
        "offline_texts_per_s_by_round": offline_by_round,
        "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 2), "p99": round(float(np.percentile(ms, 99)), 2)}
        if len(ms) else None,
        # share of one core over the measured windows (2.0 = both cores of a 2-core machine)
        "load_generator_cores": round(sum(run["client_cpu_seconds"] for run in runs) / args.seconds, 3),
        "server_cores": round(sum(run["server_cpu_seconds"] for run in runs) / args.seconds, 3),
        "machine": describe_cpu(),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
