"""Torch threads beside a busy neighbour: is 2 OpenMP threads on 2 cores still faster than 1 when another
process keeps one core busy? (docs/training.md once measured a 10x slowdown of 2 threads on a shared CPU.)

Times a SmolLM2-sized layer stack (forward + backward of 576 -> 1536 -> 576 MLPs on 256 tokens) with 1 and 2
threads, first alone, then beside a busy-loop process, in the dtype ``auto`` picks on this CPU.

    .venv/bin/python bench/bench_threads.py [--dtype auto|float32|bfloat16] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time

import torch

from embedkit.backbone import resolve_dtype
from embedkit.hardware import describe_cpu


def busy(stop_after: float) -> None:
    end = time.time() + stop_after
    x = 0
    while time.time() < end:
        x += 1


def step_time(dtype: torch.dtype, threads: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layers = [(torch.randn(576, 1536, dtype=dtype, requires_grad=True),
               torch.randn(1536, 576, dtype=dtype, requires_grad=True)) for _ in range(6)]
    x = torch.randn(256, 576, dtype=dtype)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        h = x
        for up, down in layers:
            h = h + torch.nn.functional.silu(h @ up) @ down * 0.01
        h.float().square().mean().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--neighbours", type=int, default=1, help="busy-loop processes beside the timed runs")
    args = parser.parse_args()
    dtype = resolve_dtype(args.dtype)
    rows = {}
    for neighbour in (False, True):
        procs = [multiprocessing.Process(target=busy, args=(600,), daemon=True)
                 for _ in range(args.neighbours if neighbour else 0)]
        for proc in procs:
            proc.start()
        time.sleep(1 if procs else 0)
        try:
            for threads in (1, 2):
                label = f"{args.neighbours} busy neighbour(s)" if neighbour else "alone"
                rows[f"{threads} thread{'s' * (threads > 1)}, {label}"] = (
                    step_time(dtype, threads, args.repeats))
        finally:
            for proc in procs:
                proc.terminate()
                proc.join()
    report = {"dtype": str(dtype).removeprefix("torch."), "machine": describe_cpu(),
              "median_step_seconds": {k: round(v, 4) for k, v in rows.items()},
              "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
