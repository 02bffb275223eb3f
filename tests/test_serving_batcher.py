"""The dynamic batcher alone, with a fake model: merging, limits, cancelled requests, failing batches."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from embedkit.batching import Tokenized
from embedkit.serving import DynamicBatcher, QueueFull
from embedkit.serving.model_call import ModelCall


def rows(*values: int) -> Tokenized:
    """One row per value; the fake model's vector of a row is [value, number of rows in its model call]."""
    return Tokenized([[v] for v in values], [0] * len(values))


class FakeModel:
    """Records each call's rows; optionally blocks until released or fails."""

    def __init__(self):
        self.calls: list[list[int]] = []
        self.started: list[float] = []  # time.monotonic() when each call got past ``release``
        self.release = threading.Event()
        self.release.set()
        self.fail = False

    def __call__(self, tokenized: Tokenized) -> np.ndarray:
        self.release.wait(10)
        self.started.append(time.monotonic())
        self.calls.append([ids[0] for ids in tokenized.ids])
        if self.fail:
            raise RuntimeError("model broke")
        return np.array([[ids[0], len(tokenized)] for ids in tokenized.ids], dtype=np.float32)


def run(coroutine_function):
    return asyncio.run(coroutine_function())


def test_concurrent_requests_share_one_model_call_and_get_their_own_rows():
    model = FakeModel()

    async def main():
        batcher = DynamicBatcher(model, max_wait=0.05)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(rows(i, 100 + i)) for i in range(10)))
        await batcher.stop()
        return results

    results = run(main)
    assert len(model.calls) == 1 and sorted(model.calls[0]) == sorted([*range(10), *range(100, 110)])
    for i, vectors in enumerate(results):
        np.testing.assert_array_equal(vectors, [[i, 20], [100 + i, 20]])


def test_requests_queued_while_the_model_runs_go_in_together_without_another_wait():
    model = FakeModel()
    model.release.clear()

    async def main():
        batcher = DynamicBatcher(model, max_wait=1.0)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(rows(1)))
        await asyncio.sleep(1.1)  # alone at an idle model: after its 1 s window it is in the model (blocked)
        queued = [asyncio.ensure_future(batcher.submit(rows(i))) for i in (2, 3, 4)]
        await asyncio.sleep(0.02)
        released = time.monotonic()
        model.release.set()
        results = await asyncio.gather(first, *queued)
        await batcher.stop()
        return released, results

    released, results = run(main)
    assert model.calls == [[1], [2, 3, 4]]
    assert model.started[1] - released < 0.5  # not the 1 s window again: they waited while the model ran
    assert [r.tolist() for r in results] == [[[1, 1]], [[2, 3]], [[3, 3]], [[4, 3]]]


def test_max_batch_texts_caps_a_merge_but_a_larger_request_runs_alone():
    model = FakeModel()

    async def main():
        batcher = DynamicBatcher(model, max_wait=0.05, max_batch_texts=3)
        batcher.start()
        big = await batcher.submit(rows(1, 2, 3, 4, 5))
        small = await asyncio.gather(*(batcher.submit(rows(i)) for i in range(6)))
        await batcher.stop()
        return big, small

    big, small = run(main)
    assert model.calls[0] == [1, 2, 3, 4, 5]
    assert [len(call) for call in model.calls[1:]] == [3, 3]
    assert [int(v[0, 0]) for v in small] == list(range(6))


def test_a_full_queue_refuses_instead_of_growing():
    model = FakeModel()
    model.release.clear()

    async def main():
        batcher = DynamicBatcher(model, max_wait=0, max_batch_texts=1, max_queue_texts=2)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(rows(1)))
        await asyncio.sleep(0.05)  # the first request is in the model now (blocked)
        assert batcher.queued_texts == 0
        waiting = [asyncio.ensure_future(batcher.submit(rows(i))) for i in (2, 3)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match=r"The server is busy \(2 texts queued, limit 2\): retry shortly."):
            await batcher.submit(rows(4))
        model.release.set()
        results = await asyncio.gather(first, *waiting)
        await batcher.stop()
        return results

    results = run(main)
    assert [int(r[0, 0]) for r in results] == [1, 2, 3]


def test_a_cancelled_request_is_dropped_and_the_loop_goes_on():
    model = FakeModel()
    model.release.clear()

    async def main():
        batcher = DynamicBatcher(model, max_wait=0, max_batch_texts=1)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(rows(1)))
        await asyncio.sleep(0.05)  # in the model, blocked
        gone = asyncio.ensure_future(batcher.submit(rows(2)))
        await asyncio.sleep(0.01)
        gone.cancel()  # what a disconnecting client's request does
        model.release.set()
        later = await batcher.submit(rows(3))
        await batcher.stop()
        return await first, later

    first, later = run(main)
    assert model.calls == [[1], [3]]  # the cancelled request never reached the model
    assert int(first[0, 0]) == 1 and int(later[0, 0]) == 3


def test_a_failing_batch_fails_its_requests_only():
    model = FakeModel()

    async def main():
        batcher = DynamicBatcher(model, max_wait=0.02)
        batcher.start()
        model.fail = True
        outcomes = await asyncio.gather(batcher.submit(rows(1)), batcher.submit(rows(2)), return_exceptions=True)
        model.fail = False
        after = await batcher.submit(rows(3))
        await batcher.stop()
        return outcomes, after

    outcomes, after = run(main)
    assert [str(o) for o in outcomes] == ["model broke", "model broke"]
    assert int(after[0, 0]) == 3


def test_stop_fails_what_is_still_queued():
    model = FakeModel()
    model.release.clear()

    async def main():
        batcher = DynamicBatcher(model, max_wait=0, max_batch_texts=1)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(rows(1)))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit(rows(2)))
        await asyncio.sleep(0.01)
        await batcher.stop()
        model.release.set()
        return await asyncio.gather(first, queued, return_exceptions=True)

    first, queued = run(main)
    assert isinstance(first, asyncio.CancelledError)
    assert str(queued) == "The server is shutting down."


class RecordingEmbedder:
    """Records the ``workers`` of each encode_tokenized call."""

    def __init__(self):
        self.workers: list[int] = []

    def encode_tokenized(self, tokenized, *, max_batch_tokens, workers, show_progress_bar, packed):
        self.workers.append(workers)
        return np.zeros((len(tokenized), 4), dtype=np.float32)


def test_a_merged_batch_gets_parallel_workers_only_with_a_token_budget_per_worker():
    embedder = RecordingEmbedder()
    call = ModelCall(embedder, max_batch_tokens=100, workers=2)
    small = Tokenized([[1] * 10] * 19, [0] * 19)  # 190 tokens: one forward on all intra-op threads
    large = Tokenized([[1] * 10] * 20, [0] * 20)  # 200 tokens: a full budget for each of 2 workers
    assert call(small).shape == (19, 4) and call(large).shape == (20, 4)
    assert embedder.workers == [1, 2]


class SlowModel(FakeModel):
    """A FakeModel whose calls take ``seconds``."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def __call__(self, tokenized: Tokenized) -> np.ndarray:
        time.sleep(self.seconds)
        return super().__call__(tokenized)


@pytest.mark.parametrize(("share", "expected"), [(0.0, [[1, 2, 3, 4], [5], [6, 7, 8]]),
                                                 (0.5, [[1, 2, 3, 4], [5, 6, 7, 8]])])
def test_a_free_model_waits_a_share_of_its_last_call_for_the_clients_it_answered(share, expected):
    model = SlowModel(0.3)

    async def main():
        batcher = DynamicBatcher(model, max_wait=0, rejoin_share=share)
        batcher.start()

        async def client(first: int) -> None:  # answered, it sends again after a delay
            await batcher.submit(rows(first))
            await asyncio.sleep(0.0 if first == 1 else 0.05)
            await batcher.submit(rows(first + 4))

        await asyncio.gather(*(client(i) for i in (1, 2, 3, 4)))
        await batcher.stop()

    run(main)
    assert [sorted(call) for call in model.calls] == expected


def test_a_packed_merged_batch_runs_on_every_worker():
    embedder = RecordingEmbedder()
    call = ModelCall(embedder, max_batch_tokens=1024, workers=2, packed=True)
    call(Tokenized([[1] * 10] * 3, [0] * 3))
    call(Tokenized([[1] * 10], [0]))
    assert embedder.workers == [2, 1]
