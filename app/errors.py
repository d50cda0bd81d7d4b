"""One JSON error shape for every HTTP failure: ``{"error": code, "message": text}``, and
``"field"`` (its path, such as ``requirements.cpu_cores``) when one field is at fault."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from flask_limiter.errors import RateLimitExceeded
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from store.db import Unavailable, is_outage

log = logging.getLogger(__name__)

CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    500: "internal",
    503: "unavailable",
}


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, *, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or CODES.get(status, "error")
        self.message = message
        self.field = field  # the path of the field at fault ("requirements.cpu_cores"), when one is


def error_response(
    status: int, message: str, code: str | None = None, field: str | None = None
) -> tuple[Response, int]:
    body = {"error": code or CODES.get(status, "error"), "message": message}
    if field is not None:
        body["field"] = field
    response = jsonify(body)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="aifarm"'
    if status == 503:
        response.headers["Retry-After"] = "5"
    return response, status


def register(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(error: ApiError) -> tuple[Response, int]:
        return error_response(error.status, error.message, error.code, error.field)

    @app.errorhandler(RateLimitExceeded)
    def _rate_limited(error: RateLimitExceeded) -> tuple[Response, int]:
        return error_response(429, f"rate limit exceeded: {error.description}")

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> tuple[Response, int]:
        status = error.code or 500
        message = error.description or error.name
        if status == 413:
            message = "request body too large"
        response, status = error_response(status, message)
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            response.headers["Allow"] = ", ".join(error.valid_methods)  # RFC 9110: a 405 lists them
        return response, status

    @app.errorhandler(Unavailable)
    def _unavailable(error: Unavailable) -> tuple[Response, int]:
        return error_response(503, str(error) or "service unavailable; nothing was changed")

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> tuple[Response, int]:
        if is_outage(error):
            return error_response(503, "database unavailable; nothing was changed")
        log.exception("event=http_error")
        return error_response(500, "internal error")
