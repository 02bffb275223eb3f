"""Reliability of ``embedkit serve`` (issue 14): memory under overload, clients that give up, kill -9 and restart.

1. Overload: many concurrent 8-text requests against a small queue (``--max-queue``): the queue limit must hold
   (503 + Retry-After beyond it) and the server's RSS stay bounded; reports the status counts and peak RSS.
2. Clients that disconnect: requests abandoned after a few ms must not wedge the batcher: a normal request right
   after them gets its answer.
3. kill -9 under load, then restart on the same index: it serves again and the index files are byte-identical.

Only 127.0.0.1; every loop is bounded in count and time and stops by itself.

    .venv/bin/python bench/bench_serve_reliability.py [--model smollm2-135m] [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import free_port, wait_ready  # noqa: E402

from embedkit.corpus import encode_corpus  # noqa: E402
from embedkit.embedder import open_model  # noqa: E402
from embedkit.hardware import describe_cpu  # noqa: E402
from embedkit.index import BuildOptions, build_index  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = ROOT.parent / "shared" / "data" / "unlabeled" / "TinyStories" / "sentences.txt"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def start(model: str, index: Path, port: int, log_path: Path, max_queue: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "embedkit", "serve", model, "--index", str(index), "--host", "127.0.0.1",
               "--port", str(port), "--model-name", "bench", "--max-queue", str(max_queue), "--max-texts", "64"]
    with log_path.open("ab") as log:
        return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                stdout=subprocess.DEVNULL, stderr=log)


async def overload(url: str, texts: list[str], requests: int, pid: int) -> dict:
    statuses: dict[int, int] = {}
    peak = rss_mb(pid)
    async with httpx2.AsyncClient(timeout=120) as client:
        async def one(i: int) -> None:
            batch = [texts[(i * 8 + j) % len(texts)] for j in range(8)]
            response = await client.post(url + "/v1/embeddings", json={"input": batch, "model": "bench"})
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        tasks = [asyncio.create_task(one(i)) for i in range(requests)]
        while not all(t.done() for t in tasks):
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"statuses": statuses, "peak_rss_mb": round(peak, 1)}


async def abandon(url: str, texts: list[str], count: int) -> dict:
    abandoned = 0
    async with httpx2.AsyncClient(timeout=0.005) as client:
        for i in range(count):
            try:
                await client.post(url + "/v1/embeddings", json={"input": texts[i % len(texts)], "model": "bench"})
            except httpx2.TimeoutException:
                abandoned += 1
    began = time.perf_counter()
    async with httpx2.AsyncClient(timeout=60) as client:
        response = await client.post(url + "/v1/embeddings", json={"input": texts[0], "model": "bench"})
    return {"abandoned": abandoned, "next_request_status": response.status_code,
            "next_request_seconds": round(time.perf_counter() - began, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=400, help="concurrent 8-text requests in the overload")
    parser.add_argument("--max-queue", type=int, default=256, help="the server's queue limit (texts)")
    args = parser.parse_args()
    texts = SENTENCES.read_text().splitlines()[:400]
    report: dict = {"model": args.model, "machine": describe_cpu()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "corpus.txt").write_text("\n".join(texts) + "\n")
        embedder = open_model(args.model)
        encode_corpus(embedder, [tmp / "corpus.txt"], tmp / "vectors", model_spec=args.model)
        build_index(tmp / "vectors", tmp / "index", BuildOptions(index_type="flat"))
        before = digests(tmp / "index")
        del embedder
        port, log = free_port(), tmp / "server.log"
        url = f"http://127.0.0.1:{port}"
        server = start(args.model, tmp / "index", port, log, args.max_queue)
        try:
            wait_ready(url, server, log)
            report["rss_ready_mb"] = round(rss_mb(server.pid), 1)
            report["overload"] = asyncio.run(overload(url, texts, args.requests, server.pid))
            report["disconnects"] = asyncio.run(abandon(url, texts, 50))
            loader = subprocess.Popen([sys.executable, "-c", (
                "import httpx2, sys\n"
                "for i in range(2000):\n"
                "    try: httpx2.post(sys.argv[1] + '/v1/embeddings', json={'input': 'x' * 50, 'model': 'bench'},"
                " timeout=5)\n"
                "    except Exception: pass\n"), url])
            time.sleep(3)
            server.send_signal(signal.SIGKILL)
            server.wait()
            loader.kill()
            loader.wait()
            report["index_unchanged_after_kill"] = digests(tmp / "index") == before
            server = start(args.model, tmp / "index", port, log, args.max_queue)
            wait_ready(url, server, log)
            hits = httpx2.post(url + "/v1/search", json={"query": texts[3], "k": 1}, timeout=60).json()
            report["restart_search_hits"] = hits["data"][0]["hits"]
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(json.dumps(report, indent=2)[:4000])


if __name__ == "__main__":
    main()
