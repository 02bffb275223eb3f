"""Request ids, the body-size check before a body is read, and one access line per request, as plain ASGI.

Starlette's ``@app.middleware("http")`` (``BaseHTTPMiddleware``) runs every request through a task group and a
memory stream; on a 2-core machine serving one-text requests that overhead is CPU the model does not get.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from embedkit.serving.errors import error_response

logger = logging.getLogger(__name__)

REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")  # a client's id is logged as is: nothing that forges lines


class RequestContext:
    """Gives every HTTP request an id (the client's ``X-Request-ID`` if sane), in ``request.state.request_id``
    and the response's ``X-Request-ID``; answers 413 from ``Content-Length`` before reading a body over
    ``max_request_bytes``; logs method, path, status and time."""

    def __init__(self, app, max_request_bytes: int):
        self.app = app
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500  # what the log says if the app fails before answering

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
            await send(message)

        size = headers.get(b"content-length", b"")
        try:
            if size.isdigit() and int(size) > self.max_request_bytes:  # FastAPI's max_body_size stops streamed ones
                response = error_response(413, f"The request body has {int(size)} bytes; the limit is "
                                          f"{self.max_request_bytes}: split it into several requests.",
                                          code="body_too_large")
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            logger.info("%s %s %s -> %d (%.1f ms)", request_id, scope["method"], scope["path"], status,
                        1000 * (time.perf_counter() - start))
