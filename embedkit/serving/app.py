"""The FastAPI app: OpenAI's ``/v1/embeddings``, ``/v1/search`` over an index, ``/v1/models``, ``/health``.

The model loads in the background after the server starts listening (``/health`` answers 503 until it is
ready). Every request gets an id (the client's ``X-Request-ID`` if it sent a sane one), returned in the
response header and written in the access log line.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from embedkit.batching import Tokenized
from embedkit.serving.batcher import DynamicBatcher, QueueFull
from embedkit.serving.config import ServeSettings
from embedkit.serving.errors import APIError, install_error_handlers
from embedkit.serving.middleware import RequestContext
from embedkit.serving.model_call import ModelCall
from embedkit.serving.schemas import EmbeddingRequest, SearchRequest, usage
from embedkit.serving.vectors import ORJSONResponse, to_base64, truncate_dimensions

logger = logging.getLogger(__name__)

INLINE_TOKENIZE_CHARS = 4096  # requests this small are tokenized on the event loop (by a fast tokenizer: < 0.2 ms)

# (embedder, index or None): called once, on a thread, when the server starts
Loader = Callable[[], tuple[object, object | None]]


@dataclass
class Loaded:
    """What serves requests once loading is done."""

    embedder: object
    index: object | None
    batcher: DynamicBatcher
    tokenize_lock: threading.Lock  # a fast tokenizer object must not be used by two threads at once


def create_app(settings: ServeSettings, load: Loader, on_load_error: Callable[[BaseException], None] | None = None
               ) -> FastAPI:
    """The app for one model (and optionally one index). ``load`` runs on a thread at startup; if it fails, the
    error is logged, ``/health`` reports it and ``on_load_error`` is called (``serve`` stops the server)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.get_running_loop().create_task(_load(app, settings, load, on_load_error))
        yield
        loading.cancel()
        if app.state.loaded is not None:
            await app.state.loaded.batcher.stop()

    app = FastAPI(title="embedkit", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.loaded = None
    app.state.load_error = None
    app.state.started = int(time.time())
    install_error_handlers(app)
    app.add_middleware(RequestContext, max_request_bytes=settings.max_request_bytes)
    app.get("/health")(_health)
    router = APIRouter(prefix="/v1", dependencies=[Depends(_require_api_key)],
                       max_body_size=settings.max_request_bytes)  # bodies streamed without a Content-Length
    router.get("/models")(_models)
    router.post("/embeddings")(_embeddings)
    router.post("/search")(_search)
    app.include_router(router)
    return app


async def _load(app: FastAPI, settings: ServeSettings, load: Loader, on_error) -> None:
    # The model loads on the thread that will run it: torch's OpenMP runtime (libgomp) keeps a thread team per
    # thread that ran parallel work, and once a process has more OpenMP threads than cores, idle ones stop
    # spinning, so each of the hundreds of small kernels of a forward waits for a wake-up. A forward on another
    # thread than the loading one is measurably slower (docs/serving.md).
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedkit-model")
    try:
        embedder, index = await asyncio.get_running_loop().run_in_executor(model_thread, load)
        if settings.default_dimensions and settings.default_dimensions > embedder.dimension:
            raise ValueError(f"--dimensions {settings.default_dimensions} is more than the model's "
                             f"{embedder.dimension}: give at most {embedder.dimension}.")
        embedder.eval()
        encode = await asyncio.get_running_loop().run_in_executor(model_thread, partial(
            ModelCall.build, embedder, packed=settings.packed, max_batch_tokens=settings.max_batch_tokens,
            workers=settings.workers or embedder.default_workers()))
        batcher = DynamicBatcher(encode, max_wait=settings.max_wait_ms / 1000, max_batch_texts=settings.max_batch_texts,
                                 max_queue_texts=settings.max_queue_texts, executor=model_thread,
                                 rejoin_share=settings.rejoin_share)
        batcher.start()
        app.state.loaded = Loaded(embedder, index, batcher, threading.Lock())
        logger.info("serving %s (%d-d)%s", settings.model_name, embedder.dimension,
                    f" with an index of {len(index):,} vectors" if index is not None else "")
    except Exception as error:  # noqa: BLE001 - reported on /health and to the caller
        model_thread.shutdown(wait=False)
        app.state.load_error = str(error)
        if on_error is None:
            logger.error("loading the model failed: %s", error)
        else:
            on_error(error)


# -- cross-cutting: API key ----------------------------------------------------------------------------------
async def _require_api_key(request: Request) -> None:
    key = request.app.state.settings.api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise APIError(401, "Missing API key: send the header 'Authorization: Bearer <key>'.",
                       code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), key.get_secret_value().encode()):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


# -- routes -----------------------------------------------------------------------------------------------------
async def _health(request: Request) -> JSONResponse:
    state = request.app.state
    if state.loaded is not None:
        return JSONResponse({"status": "ok", "model": state.settings.model_name})
    if state.load_error is not None:
        return JSONResponse({"status": "failed", "error": state.load_error}, status_code=503)
    return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})


async def _models(request: Request) -> dict:
    state = request.app.state
    return {"object": "list", "data": [{"id": state.settings.model_name, "object": "model",
                                        "created": state.started, "owned_by": "embedkit"}]}


async def _embeddings(body: EmbeddingRequest, request: Request) -> ORJSONResponse:
    settings: ServeSettings = request.app.state.settings
    loaded = _ready(request)
    _check_model_name(body.model, settings)
    texts = check_input(body.input, "input", settings)
    width = loaded.embedder.dimension
    dimensions = body.dimensions or settings.default_dimensions
    if dimensions is not None and dimensions > width:
        raise APIError(400, f"dimensions={dimensions} is more than the model's {width}: ask for at most {width}.",
                       param="dimensions", code="invalid_value")
    tokenized = await _tokenize(loaded, texts, _instruction(body, loaded.embedder.config), "input", settings)
    vectors = await _encode(loaded, tokenized, settings)
    vectors = truncate_dimensions(vectors, dimensions, renormalize=loaded.embedder.config.normalize)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    as_base64 = body.encoding_format == "base64"
    data = [{"object": "embedding", "index": i, "embedding": to_base64(v) if as_base64 else v}
            for i, v in enumerate(vectors)]
    return ORJSONResponse({"object": "list", "data": data, "model": settings.model_name,
                            "usage": usage(sum(map(len, tokenized.ids)))})


async def _search(body: SearchRequest, request: Request) -> ORJSONResponse:
    settings: ServeSettings = request.app.state.settings
    loaded = _ready(request)
    if loaded.index is None:
        raise APIError(404, "No index is loaded: start the server with --index INDEX_DIR to search.",
                       code="no_index")
    if body.model is not None:
        _check_model_name(body.model, settings)
    if body.k > settings.max_k:
        raise APIError(400, f"k={body.k} is above the limit of {settings.max_k} hits per query.", param="k",
                       code="invalid_value")
    queries = check_input(body.query, "query", settings)
    config = loaded.embedder.config
    instruction = config.query_instruction if body.instruction is None else body.instruction
    tokenized = await _tokenize(loaded, queries, instruction or None, "query", settings)
    vectors = await _encode(loaded, tokenized, settings)
    results = await run_in_threadpool(loaded.index.search, vectors, body.k, ef_search=body.ef_search,
                                      nprobe=body.nprobe)
    data = [{"object": "search_result", "index": i, "hits": [hit.to_dict() for hit in hits]}
            for i, hits in enumerate(results)]
    return ORJSONResponse({"object": "list", "data": data, "model": settings.model_name,
                            "usage": usage(sum(map(len, tokenized.ids)))})


# -- helpers of the routes ----------------------------------------------------------------------------------------
def _ready(request: Request) -> Loaded:
    loaded = request.app.state.loaded
    if loaded is None:
        raise APIError(503, "The model is still loading: retry shortly.", code="model_loading",
                       headers={"Retry-After": "1"})
    return loaded


def _check_model_name(name: str, settings: ServeSettings) -> None:
    if name != settings.model_name:
        raise APIError(404, f"The model '{name}' does not exist: this server serves '{settings.model_name}'.",
                       param="model", code="model_not_found")


def check_input(value: str | list, param: str, settings: ServeSettings) -> list[str]:
    """The texts of a request, or a 400/413 naming the first text at fault and the fix."""
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise APIError(400, f"{param} is an empty list: send at least one text.", param=param, code="empty_input")
    if len(texts) > settings.max_texts_per_request:
        raise APIError(413, f"{param} has {len(texts)} texts; the limit is {settings.max_texts_per_request} per "
                       "request: split it into several requests.", param=param, code="too_many_texts")
    for i, text in enumerate(texts):
        where = param if isinstance(value, str) else f"{param}[{i}]"
        if not isinstance(text, str):
            raise APIError(400, f"{where} is {type(text).__name__}, not a string: send texts (token-id input is "
                           "not supported).", param=param, code="invalid_type")
        if not text.strip():
            raise APIError(400, f"{where} is empty or whitespace only: drop it or give it content.", param=param,
                           code="empty_text")
        if len(text) > settings.max_chars_per_text:
            raise APIError(413, f"{where} has {len(text)} characters; the limit is {settings.max_chars_per_text}: "
                           "shorten or split it.", param=param, code="text_too_long")
    return texts


def _instruction(body: EmbeddingRequest, config) -> str | None:
    if body.instruction is not None and body.input_type is not None:
        raise APIError(400, "Give instruction or input_type, not both.", param="instruction", code="invalid_value")
    if body.instruction is not None:
        return body.instruction or None
    if body.input_type is not None:
        return getattr(config, f"{body.input_type}_instruction")
    return None


async def _tokenize(loaded: Loaded, texts: list[str], instruction: str | None, param: str,
                    settings: ServeSettings) -> Tokenized:
    def tokenize() -> Tokenized:
        with loaded.tokenize_lock:
            return loaded.embedder.tokenize(texts, instruction)

    try:
        inline = getattr(loaded.embedder.tokenizer, "is_fast", False) and sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS
        if inline and loaded.tokenize_lock.acquire(blocking=False):
            try:  # tens of microseconds: cheaper than a hop to the thread pool and back
                tokenized = loaded.embedder.tokenize(texts, instruction)
            finally:
                loaded.tokenize_lock.release()
        else:
            tokenized = await run_in_threadpool(tokenize)
    except ValueError as error:  # e.g. an instruction that leaves no room within max_length
        raise APIError(400, str(error), param="instruction", code="invalid_value") from error
    tokens = sum(map(len, tokenized.ids))
    if tokens > settings.max_tokens_per_request:
        raise APIError(413, f"{param} has {tokens} tokens; the limit is {settings.max_tokens_per_request} per "
                       "request: split it into several requests.", param=param, code="too_many_tokens")
    return tokenized


async def _encode(loaded: Loaded, tokenized: Tokenized, settings: ServeSettings):
    try:
        return await loaded.batcher.submit(tokenized)
    except QueueFull as error:
        raise APIError(503, str(error), code="queue_full",
                       headers={"Retry-After": str(settings.retry_after_seconds)}) from error
