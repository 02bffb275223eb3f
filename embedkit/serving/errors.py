"""Errors in OpenAI's JSON shape, ``{"error": {"message", "type", "param", "code"}}``, so that OpenAI clients
raise their usual exceptions (BadRequestError, AuthenticationError, NotFoundError, ...) with our message."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

TEXT_FIELDS = ("input", "query")  # str | list fields



class APIError(Exception):
    """An error answered to the client: status, one-line message, the request field at fault, a code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def describe_validation_error(error: RequestValidationError) -> tuple[str, str | None]:
    """The first problem of a request that did not validate, as (message, param)."""
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "invalid JSON")
        return f"The request body is not valid JSON ({detail} at character {loc[0] if loc else '?'}).", None
    if not loc:
        return "The request body must be a JSON object (send Content-Type: application/json).", None
    param = loc[0]  # every field is top level; deeper parts name pydantic's union branches (input.str)
    if param in TEXT_FIELDS and len(loc) > 1:
        return f"{param} must be a string or a list of strings.", param
    return f"{param}: {first.get('msg', 'invalid value')}.", param


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app answers with, FastAPI's own included, leaves in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error.status, error.message, param=error.param, code=error.code,
                              headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(error)
        return error_response(400, message, param=param, code="invalid_value" if param else "invalid_json")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException) -> JSONResponse:
        message = error.detail if isinstance(error.detail, str) else str(error.detail)
        return error_response(error.status_code, message, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:  # logged by the server too
        request_id = getattr(request.state, "request_id", "?")
        return error_response(500, f"Internal error ({type(error).__name__}); see the server log, request id "
                              f"{request_id}.", code="internal_error")
