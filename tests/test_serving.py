"""``embedkit serve`` end to end: a real uvicorn server on a free localhost port, called with the official
``openai`` client and with raw HTTP. Vectors, usage and search results equal embedkit's own; bad input gets the
right status and message; 50 concurrent requests each get their own vector; a full queue answers 503."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import numpy as np
import openai
import pytest
import uvicorn

from embedkit import attention as attn
from embedkit.corpus import encode_corpus
from embedkit.embedder import open_model
from embedkit.index import BuildOptions, Index, build_index
from embedkit.serving import ServeSettings, create_app, truncate_dimensions
from embedkit.serving.vectors import from_base64

REPO = Path(__file__).resolve().parent.parent
STORIES = REPO.parent / "shared" / "models" / "stories260K"
SENTENCES = REPO.parent / "shared" / "data" / "unlabeled" / "TinyStories" / "sentences.txt"
QUERY_INSTRUCTION = "Find a sentence like this one: "
KEY = "sk-test-key"
NAME = "stories"
AUTH = {"Authorization": f"Bearer {KEY}"}
SETTINGS = ServeSettings(model_name=NAME, api_key=KEY, max_texts_per_request=8, max_chars_per_text=2000,
                         max_tokens_per_request=150, max_request_bytes=20_000, max_queue_texts=64, max_k=50)


class ServerThread:
    """``with ServerThread(app) as url:`` serves ``app`` on 127.0.0.1 until the block ends (ready: /health 200)."""

    def __init__(self, app, ready_timeout: float = 60.0):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))  # bound before the thread starts: no port race
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.ready_timeout = ready_timeout

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            try:
                if httpx2.get(self.url + "/health", timeout=2).status_code == 200:
                    return self.url
            except httpx2.TransportError:
                pass
            time.sleep(0.05)
        self.__exit__()
        raise TimeoutError(f"the test server at {self.url} did not become ready")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.socket.close()


def open_stories():
    return open_model(STORIES, dtype="float32", max_length=48, query_instruction=QUERY_INSTRUCTION)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return SENTENCES.read_text(encoding="utf-8").splitlines()[:120]


@pytest.fixture(scope="module")
def reference():
    return open_stories()


@pytest.fixture(scope="module")
def flat(tmp_path_factory, reference, texts):
    folder = tmp_path_factory.mktemp("serve-index")
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"s{i}", "text": t}) + "\n" for i, t in enumerate(texts)),
                      encoding="utf-8")
    encode_corpus(reference, [corpus], folder / "vectors", model_spec=STORIES, shard_size=50)
    build_index(folder / "vectors", folder / "flat", BuildOptions(index_type="flat"))
    return folder / "flat"


@pytest.fixture(scope="module")
def url(flat):
    served = open_stories()
    app = create_app(SETTINGS, lambda: (served, Index.load(flat, embedder=served)))
    with ServerThread(app) as base:
        yield base


@pytest.fixture()
def client(url):
    return openai.OpenAI(api_key=KEY, base_url=url + "/v1", max_retries=0)


def post(url: str, path: str, body, headers=AUTH, timeout: float = 30) -> httpx2.Response:
    if isinstance(body, bytes):
        return httpx2.post(url + path, content=body, headers={**headers, "Content-Type": "application/json"},
                           timeout=timeout)
    return httpx2.post(url + path, json=body, headers=headers, timeout=timeout)


# -- the happy paths -----------------------------------------------------------------------------------------
def test_openai_client_gets_embedder_vectors_and_usage(client, reference, texts):
    batch = texts[:5]
    expected = reference.encode(batch)
    tokens = sum(len(ids) for ids in reference.tokenize(batch).ids)
    for encoding_format in ("float", None):  # None: the client's default (it may ask for base64 and decode)
        extra = {"encoding_format": encoding_format} if encoding_format else {}
        response = client.embeddings.create(input=batch, model=NAME, **extra)
        assert response.model == NAME
        assert [d.index for d in response.data] == [0, 1, 2, 3, 4]
        got = np.array([d.embedding for d in response.data], dtype=np.float32)
        assert got.shape == (5, 64)
        assert cosines(got, expected).min() >= 0.9999
        assert (response.usage.prompt_tokens, response.usage.total_tokens) == (tokens, tokens)
    single = client.embeddings.create(input=texts[7], model=NAME, encoding_format="float")
    assert cosines(np.array(single.data[0].embedding), reference.encode([texts[7]]))[0] >= 0.9999


def test_dimensions_and_base64_round_trip(url, client, reference, texts):
    batch = texts[10:13]
    expected = truncate_dimensions(reference.encode(batch), 16)
    as_floats = post(url, "/v1/embeddings", {"input": batch, "model": NAME, "dimensions": 16}).json()
    as_base64 = post(url, "/v1/embeddings", {"input": batch, "model": NAME, "dimensions": 16,
                                             "encoding_format": "base64"}).json()
    floats = np.array([d["embedding"] for d in as_floats["data"]], dtype=np.float32)
    decoded = np.stack([from_base64(d["embedding"]) for d in as_base64["data"]])
    assert decoded.dtype == np.float32 and decoded.shape == (3, 16)
    np.testing.assert_array_equal(decoded, floats)  # base64 carries exactly the float32 values
    np.testing.assert_allclose(np.linalg.norm(decoded, axis=1), 1.0, atol=1e-5)  # renormalised after the cut
    assert cosines(decoded, expected).min() >= 0.9999
    via_client = client.embeddings.create(input=batch, model=NAME, dimensions=16, encoding_format="base64")
    # asked for base64 explicitly, the client hands the string over as is
    assert cosines(np.stack([from_base64(d.embedding) for d in via_client.data]), expected).min() >= 0.9999


def test_truncate_dimensions_keeps_the_first_components_at_unit_length():
    vectors = np.array([[3.0, 4.0, 12.0], [1.0, 0.0, 5.0]], dtype=np.float32)
    np.testing.assert_allclose(truncate_dimensions(vectors, 2), [[0.6, 0.8], [1.0, 0.0]], atol=1e-6)
    np.testing.assert_array_equal(truncate_dimensions(vectors, 2, renormalize=False), vectors[:, :2])
    assert truncate_dimensions(vectors, 3) is vectors and truncate_dimensions(vectors, None) is vectors
    with pytest.raises(ValueError, match="dimensions must be between 1 and 3, got 4"):
        truncate_dimensions(vectors, 4)


def test_input_type_and_instruction_use_the_embedders_instructions(url, reference, texts):
    batch = texts[20:22]
    query = post(url, "/v1/embeddings", {"input": batch, "model": NAME, "input_type": "query"}).json()
    got = np.array([d["embedding"] for d in query["data"]])
    assert cosines(got, reference.encode_queries(batch)).min() >= 0.9999
    assert cosines(got, reference.encode(batch)).max() < 0.9999  # the instruction changed the vectors
    expected_tokens = sum(len(ids) for ids in reference.tokenize(batch, QUERY_INSTRUCTION).ids)
    assert query["usage"]["prompt_tokens"] == expected_tokens
    custom = post(url, "/v1/embeddings", {"input": batch, "model": NAME, "instruction": "Story line: "}).json()
    got = np.array([d["embedding"] for d in custom["data"]])
    assert cosines(got, reference.encode(batch, instruction="Story line: ")).min() >= 0.9999
    document = post(url, "/v1/embeddings", {"input": batch, "model": NAME, "input_type": "document"}).json()
    assert cosines(np.array([d["embedding"] for d in document["data"]]), reference.encode(batch)).min() >= 0.9999


def test_search_returns_index_search_ids_scores_and_texts(url, flat, texts):
    queries = ["a little girl went to the park", texts[42]]
    response = post(url, "/v1/search", {"query": queries, "k": 5, "model": NAME})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = Index.load(flat).search(queries, k=5)
    for result, hits in zip(body["data"], expected, strict=True):
        assert [h["id"] for h in result["hits"]] == [h.id for h in hits]
        assert [h["score"] for h in result["hits"]] == pytest.approx([h.score for h in hits], abs=1e-4)
        assert [h["text"] for h in result["hits"]] == [h.text for h in hits]
    assert len(body["data"][1]["hits"]) == 5 and body["usage"]["prompt_tokens"] > 0
    single = post(url, "/v1/search", {"query": queries[0], "k": 3, "ef_search": 32}).json()
    assert [h["id"] for h in single["data"][0]["hits"]] == [h.id for h in expected[0][:3]]


def test_models_health_and_request_ids(url, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    health = httpx2.get(url + "/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok", "model": NAME})
    given = post(url, "/v1/embeddings", {"input": "hi", "model": NAME}, headers={**AUTH, "X-Request-ID": "req-42"})
    assert given.headers["X-Request-ID"] == "req-42"
    forged = post(url, "/v1/embeddings", {"input": "hi", "model": NAME},
                  headers={**AUTH, "X-Request-ID": "x\tFAKE LOG LINE"})
    assert len(forged.headers["X-Request-ID"]) == 32 and "FAKE" not in forged.headers["X-Request-ID"]


# -- bad input -----------------------------------------------------------------------------------------------
BAD_REQUESTS = [
    ({"input": [], "model": NAME}, 400, "input is an empty list: send at least one text."),
    ({"input": "", "model": NAME}, 400, "input is empty or whitespace only: drop it or give it content."),
    ({"input": ["ok", "  "], "model": NAME}, 400, "input[1] is empty or whitespace only: drop it or give it content."),
    ({"input": ["ok", 7], "model": NAME}, 400,
     "input[1] is int, not a string: send texts (token-id input is not supported)."),
    ({"input": 7, "model": NAME}, 400, "input must be a string or a list of strings."),
    ({"input": ["a"] * 9, "model": NAME}, 413,
     "input has 9 texts; the limit is 8 per request: split it into several requests."),
    ({"input": ["a " * 1001], "model": NAME}, 413,
     "input[0] has 2002 characters; the limit is 2000: shorten or split it."),
    ({"input": ["word " * 60] * 4, "model": NAME}, 413,
     "input has 192 tokens; the limit is 150 per request: split it into several requests."),
    ({"input": "hi", "model": "gpt-4"}, 404, "The model 'gpt-4' does not exist: this server serves 'stories'."),
    ({"input": "hi", "model": NAME, "dimensions": 65}, 400,
     "dimensions=65 is more than the model's 64: ask for at most 64."),
    ({"input": "hi", "model": NAME, "dimensions": 0}, 400, "dimensions: Input should be greater than or equal to 1."),
    ({"input": "hi", "model": NAME, "dimension": 8}, 400, "dimension: Extra inputs are not permitted."),
    ({"input": "hi", "model": NAME, "encoding_format": "int8"}, 400,
     "encoding_format: Input should be 'float' or 'base64'."),
    ({"input": "hi"}, 400, "model: Field required."),
    ({"input": "hi", "model": NAME, "instruction": "q: ", "input_type": "query"}, 400,
     "Give instruction or input_type, not both."),
    (b'{"input": "hi", "model": ', 400, "The request body is not valid JSON (Expecting value at character 25)."),
    (b"[1, 2]", 400, "The request body must be a JSON object (send Content-Type: application/json)."),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_REQUESTS,
                         ids=[f"{i}-{status}" for i, (_, status, _) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_status_and_message(url, body, status, message):
    response = post(url, "/v1/embeddings", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] == message
    assert error["type"] == "invalid_request_error"


def test_a_body_over_max_request_bytes_gets_413(url):
    body = json.dumps({"input": ["x" * 1900] * 8, "model": NAME, "user": "u" * 6000}).encode()
    response = post(url, "/v1/embeddings", body)
    assert response.status_code == 413
    assert response.json()["error"]["message"] == (f"The request body has {len(body)} bytes; the limit is 20000: "
                                                   "split it into several requests.")


def test_search_bad_requests(url):
    cases = [({"query": [], "k": 3}, 400, "query is an empty list: send at least one text."),
             ({"query": "hi", "k": 51}, 400, "k=51 is above the limit of 50 hits per query."),
             ({"query": "hi", "k": 0}, 400, "k: Input should be greater than or equal to 1."),
             ({"query": "hi", "model": "other"}, 404,
              "The model 'other' does not exist: this server serves 'stories'.")]
    for body, status, message in cases:
        response = post(url, "/v1/search", body)
        assert (response.status_code, response.json()["error"]["message"]) == (status, message)


def test_api_key_is_required_when_set(url):
    missing = post(url, "/v1/embeddings", {"input": "hi", "model": NAME}, headers={})
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    assert missing.json()["error"] == {"message": "Missing API key: send the header 'Authorization: Bearer <key>'.",
                                       "type": "invalid_request_error", "param": None, "code": "missing_api_key"}
    wrong = post(url, "/v1/embeddings", {"input": "hi", "model": NAME}, headers={"Authorization": "Bearer nope"})
    assert (wrong.status_code, wrong.json()["error"]["message"]) == (401, "Incorrect API key provided.")
    assert httpx2.get(url + "/v1/models").status_code == 401
    assert httpx2.get(url + "/health").status_code == 200  # probes need no key
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key provided."):
        openai.OpenAI(api_key="nope", base_url=url + "/v1", max_retries=0).embeddings.create(input="hi", model=NAME)


def test_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError, match="The model 'gpt-4' does not exist"):
        client.embeddings.create(input="hi", model="gpt-4")
    with pytest.raises(openai.BadRequestError, match="input is an empty list"):
        client.embeddings.create(input=[], model=NAME)


# -- concurrency, queue, disconnects --------------------------------------------------------------------------
def test_50_concurrent_requests_each_get_their_own_vector(url, reference, texts):
    batch = texts[30:80]
    expected = reference.encode(batch)
    assert (expected @ expected.T - np.eye(50)).max() < 0.9999  # a mix-up would show

    async def run() -> list[dict]:
        async with httpx2.AsyncClient(headers=AUTH, timeout=60) as client:
            requests = [client.post(url + "/v1/embeddings", json={"input": text, "model": NAME}) for text in batch]
            return [r.json() for r in await asyncio.gather(*requests)]

    bodies = asyncio.run(run())
    got = np.array([body["data"][0]["embedding"] for body in bodies], dtype=np.float32)
    assert cosines(got, expected).min() >= 0.9999


class Gate:
    """A forward hook that holds the model until released: the queue fills up behind it."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, embedder, input_ids, attention_mask):
        self.entered.set()
        self.release.wait(30)
        inputs = attn.model_inputs(embedder.backbone, input_ids, attention_mask, embedder.attention_bias)
        return embedder.backbone(**inputs, use_cache=False).last_hidden_state


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_full_queue_answers_503_and_a_gone_client_does_not_wedge_the_batcher(reference, texts):
    gated = open_stories()
    gate = Gate()
    gated.forward_hook = gate
    settings = ServeSettings(model_name=NAME, max_texts_per_request=2, max_queue_texts=2, max_batch_texts=1)
    app = create_app(settings, lambda: (gated, None))
    with ServerThread(app) as base, ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(post, base, "/v1/embeddings", {"input": texts[0], "model": NAME})
            assert gate.entered.wait(10)  # the model holds the first request
            with pytest.raises(httpx2.TimeoutException):  # this client gives up while queued
                post(base, "/v1/embeddings", {"input": texts[1], "model": NAME}, timeout=0.5)
            queued = pool.submit(post, base, "/v1/embeddings", {"input": texts[2], "model": NAME})
            batcher = app.state.loaded.batcher
            wait_until(lambda: batcher.queued_texts == 2)
            full = post(base, "/v1/embeddings", {"input": texts[3], "model": NAME})
            assert full.status_code == 503 and full.headers["Retry-After"] == "1"
            assert full.json()["error"] == {
                "message": "The server is busy (2 texts queued, limit 2): retry shortly.", "type": "server_error",
                "param": None, "code": "queue_full"}
        finally:
            gate.release.set()
        for future, text in ((first, texts[0]), (queued, texts[2])):
            vector = np.array(future.result().json()["data"][0]["embedding"])
            assert cosines(vector, reference.encode([text]))[0] >= 0.9999
        after = post(base, "/v1/embeddings", {"input": [texts[4], texts[5]], "model": NAME}).json()
        got = np.array([d["embedding"] for d in after["data"]])
        assert cosines(got, reference.encode(texts[4:6])).min() >= 0.9999
        wait_until(lambda: batcher.queued_texts == 0)


def test_health_is_503_until_the_model_is_loaded():
    loaded = threading.Event()

    def slow_load():
        loaded.wait(30)
        return open_stories(), None

    app = create_app(ServeSettings(model_name=NAME), slow_load)
    server = ServerThread(app)
    server.thread.start()
    try:
        wait_until(lambda: server.server.started)
        health = httpx2.get(server.url + "/health")
        assert (health.status_code, health.json()) == (503, {"status": "loading"})
        early = post(server.url, "/v1/embeddings", {"input": "hi", "model": NAME}, headers={})
        assert (early.status_code, early.json()["error"]["code"]) == (503, "model_loading")
        loaded.set()
        wait_until(lambda: httpx2.get(server.url + "/health").status_code == 200, timeout=60)
    finally:
        loaded.set()
        server.__exit__()


def test_a_model_that_fails_to_load_is_reported():
    errors = []

    def broken_load():
        raise ValueError("no such model")

    app = create_app(ServeSettings(model_name=NAME), broken_load, on_load_error=errors.append)
    server = ServerThread(app)
    server.thread.start()
    try:
        wait_until(lambda: errors)
        health = httpx2.get(server.url + "/health")
        assert (health.status_code, health.json()) == (503, {"status": "failed", "error": "no such model"})
    finally:
        server.__exit__()


class ThreadRecorder:
    """A forward hook that records the thread each forward runs on."""

    def __init__(self):
        self.threads: set[int] = set()

    def __call__(self, embedder, input_ids, attention_mask):
        self.threads.add(threading.get_ident())
        inputs = attn.model_inputs(embedder.backbone, input_ids, attention_mask, embedder.attention_bias)
        return embedder.backbone(**inputs, use_cache=False).last_hidden_state


def test_the_model_runs_on_the_thread_that_loaded_it(texts):
    """torch's OpenMP keeps a thread team per thread that ran parallel work: a second team on a small machine
    made every forward wait for wake-ups (docs/serving.md), so loading and encoding share one thread."""
    recorder = ThreadRecorder()
    loaded_on: list[int] = []

    def load():
        loaded_on.append(threading.get_ident())
        embedder = open_stories()
        embedder.forward_hook = recorder
        return embedder, None

    with ServerThread(create_app(ServeSettings(model_name=NAME), load)) as base:
        for text in texts[:3]:
            assert post(base, "/v1/embeddings", {"input": text, "model": NAME}).status_code == 200
    assert recorder.threads == set(loaded_on) and len(loaded_on) == 1
