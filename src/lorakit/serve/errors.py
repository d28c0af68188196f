"""OpenAI-shaped errors of the HTTP API, and the API-key check in front of it."""

from __future__ import annotations

import secrets
from typing import Any

from fastapi.responses import JSONResponse


class APIError(Exception):
    """An error answered with an HTTP status and OpenAI's error body (message, type, param, code)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON: {'error': {'message', 'type', 'param', 'code'}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ApiKeyMiddleware:
    """401 for /v1 requests without `Authorization: Bearer KEY`. Plain ASGI on purpose: Starlette's
    BaseHTTPMiddleware (`@app.middleware`) hides a client's disconnect from `request.is_disconnected()`,
    so a plain request whose client gave up would generate on to the end."""

    def __init__(self, app: Any, api_key: str):
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            token = header[7:] if header.lower().startswith(b"bearer ") else b""
            if not secrets.compare_digest(token, self.api_key):
                response = JSONResponse(error_body("invalid or missing API key (Authorization: Bearer KEY)",
                                                   code="invalid_api_key"), status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
