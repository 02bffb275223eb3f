"""Dynamic batching: concurrent requests merged into one model call, on a worker thread, behind a bounded queue.

One request of one text makes a batch of one: the model is mostly idle per token. Requests that arrive
together (or while the model is busy) are merged and cut into the usual token-budget batches, so 32 clients
cost about what one 32-text request does. The event loop only queues and hands out results; the model runs
on one worker thread (which may spread batches over ``workers`` threads, as ``Embedder.encode`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from embedkit.batching import Tokenized

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The batcher holds as many texts as it may; the client should retry later."""


def merge_tokenized(parts: list[Tokenized]) -> Tokenized:
    """Rows of several requests as one Tokenized (each row keeps its own instruction prefix)."""
    ids: list[list[int]] = []
    prefixes: list[int] = []
    for part in parts:
        ids.extend(part.ids)
        prefixes.extend(part.prefix_lengths)
    return Tokenized(ids, prefixes, sum(part.n_truncated for part in parts))


@dataclass
class _Job:
    tokenized: Tokenized
    future: asyncio.Future
    arrived: float = field(default=0.0)


class DynamicBatcher:
    """Queue requests' rows, run them through ``encode`` in merged batches, hand each request its own rows.

    A request that reaches an idle model waits at most ``max_wait`` seconds for others to join it; requests that
    queued while the model ran go into the next model call together, as soon as it is free. At most
    ``max_batch_texts`` texts are merged (a larger request runs alone); ``submit`` raises ``QueueFull`` rather
    than queue beyond ``max_queue_texts``. A request whose client went away is dropped, never wedges the loop.

    ``rejoin_share``: when the model is free but fewer texts are queued than its last call answered, wait up to
    this share of that call's time for them. Clients that send again once answered come back while the event
    loop sends the answers; without the wait a few early ones make a tiny call of their own, far costlier per
    text than a full one (docs/serving.md, "Where the time goes now").
    """

    def __init__(self, encode: Callable[[Tokenized], np.ndarray], *, max_wait: float = 0.005,
                 max_batch_texts: int = 256, max_queue_texts: int = 8192, executor: ThreadPoolExecutor | None = None,
                 rejoin_share: float = 0.0):
        self._encode = encode
        self.max_wait = max_wait
        self.max_batch_texts = max_batch_texts
        self.max_queue_texts = max_queue_texts
        self._jobs: deque[_Job] = deque()
        self._queued_texts = 0
        self._arrived = asyncio.Event()
        # the one thread that runs ``encode`` (pass the thread that loaded the model); stopped by ``stop``
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedkit-model")
        self._task: asyncio.Task | None = None
        self.rejoin_share = rejoin_share
        self._last_call = (0, 0.0, 0.0)  # texts, seconds and end (loop time) of the last model call

    @property
    def queued_texts(self) -> int:
        return self._queued_texts

    def start(self) -> None:
        """Start the loop that feeds the model (call from the event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="embedkit-batcher")

    async def stop(self) -> None:
        """Stop feeding the model; queued requests fail, the worker thread finishes its batch and exits."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._jobs:
            job = self._jobs.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("The server is shutting down."))
        self._queued_texts = 0
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, tokenized: Tokenized) -> np.ndarray:
        """The vectors of these rows, in order, once the model has run them with whatever else was queued."""
        if self._queued_texts + len(tokenized) > self.max_queue_texts:
            raise QueueFull(f"The server is busy ({self._queued_texts} texts queued, limit {self.max_queue_texts}): "
                            "retry shortly.")
        loop = asyncio.get_running_loop()
        job = _Job(tokenized, loop.create_future(), loop.time())
        self._jobs.append(job)
        self._queued_texts += len(tokenized)
        self._arrived.set()
        return await job.future  # cancelled with the request when the client goes away

    async def _run(self) -> None:
        while True:
            jobs = await self._next_jobs()
            if not jobs:
                continue
            try:
                merged = merge_tokenized([job.tokenized for job in jobs])
                began = asyncio.get_running_loop().time()
                vectors = await asyncio.get_running_loop().run_in_executor(self._executor, self._encode, merged)
                ended = asyncio.get_running_loop().time()
                self._last_call = (len(merged), ended - began, ended)
            except asyncio.CancelledError:
                for job in jobs:
                    job.future.cancel()
                raise
            except Exception as error:  # noqa: BLE001 - every waiting request gets the error, the loop lives on
                logger.exception("encoding a batch of %d requests failed", len(jobs))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            start = 0
            for job in jobs:
                end = start + len(job.tokenized)
                if not job.future.done():
                    job.future.set_result(vectors[start:end])
                start = end

    async def _next_jobs(self) -> list[_Job]:
        """What is queued, at once (after the rejoin wait), if requests queued while the model ran: they have had
        their company. Else wait for a request, then until the batch is full or it has waited ``max_wait``."""
        await self._await_rejoin()
        if self._jobs:
            return self._take()
        while not self._jobs:
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        deadline = self._jobs[0].arrived + self.max_wait
        while self._queued_texts < self.max_batch_texts and (left := deadline - loop.time()) > 0:
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
        return self._take()

    async def _await_rejoin(self) -> None:
        """Wait (until ``rejoin_share`` of the last call's time past its end) for as many texts as it answered."""
        texts, took, ended = self._last_call
        self._last_call = (0, 0.0, 0.0)
        loop = asyncio.get_running_loop()
        deadline = ended + self.rejoin_share * took
        target = min(texts, self.max_batch_texts)
        while self._queued_texts < target and (left := deadline - loop.time()) > 0:
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

    def _take(self) -> list[_Job]:
        """Queued jobs up to ``max_batch_texts`` texts (at least one job), skipping those nobody awaits."""
        taken: list[_Job] = []
        texts = 0
        while self._jobs:
            job = self._jobs[0]
            size = len(job.tokenized)
            if taken and texts + size > self.max_batch_texts:
                break
            self._jobs.popleft()
            self._queued_texts -= size
            if job.future.done():  # the client disconnected while queued
                continue
            taken.append(job)
            texts += size
        return taken
