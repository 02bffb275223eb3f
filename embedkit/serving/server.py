"""Run the app under uvicorn: open the model (and index) the one way embedkit opens them, stop if that fails."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import uvicorn

from embedkit.embedder import open_model
from embedkit.hardware import apply_thread_policy
from embedkit.index import Index
from embedkit.serving.app import create_app
from embedkit.serving.config import ServeSettings

logger = logging.getLogger(__name__)

API_KEY_ENV = "EMBEDKIT_API_KEY"


def model_loader(model: str, index_dir: str | None = None, *, threads: int | None = None,
                 check_model: bool = True, **open_options) -> Callable[[], tuple[object, object | None]]:
    """What the server loads at startup: the model by ``open_model`` (one override policy), under the CPU thread
    policy of the encode path, and the index checked against that model (its fingerprint must match)."""

    def load():
        apply_thread_policy(threads)
        embedder = open_model(model, **open_options)
        index = None if index_dir is None else Index.load(index_dir, embedder=embedder, check_model=check_model)
        return embedder, index

    return load


def serve(settings: ServeSettings, load: Callable[[], tuple[object, object | None]], *, host: str = "127.0.0.1",
          port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted. Raises the loading error (after the server stopped) if the model fails to load."""
    failures: list[BaseException] = []
    server: uvicorn.Server | None = None

    def stop(error: BaseException) -> None:
        failures.append(error)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, load, on_load_error=stop)
    logging.getLogger("embedkit.serving").setLevel(getattr(logging, log_level.upper()))  # access lines with ids
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: reachable from other machines%s", host,
                       "" if settings.api_key else f" and without an API key (set --api-key or {API_KEY_ENV})")
    # uvicorn's access log has no request ids; the app writes its own access lines
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                           timeout_graceful_shutdown=5))
    server.run()
    if failures:
        raise failures[0]


def api_key_from_env(given: str | None) -> str | None:
    """``--api-key``, else the environment's ``EMBEDKIT_API_KEY`` (empty means none)."""
    return given or os.environ.get(API_KEY_ENV) or None
