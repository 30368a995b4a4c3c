"""The edge of the server: what is refused before any route sees it, and the headers every
response carries.

Text no database can store and no JSON encoder can write back -- NUL bytes and lone UTF-16
surrogates -- is refused with a 422 wherever it comes: the path, the query, a JSON or form
body. Bodies over the limit are refused with a 413. Routes validate the rest (lengths, ranges).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
#: Largest request body read (a run's params are limited separately, MLP_MAX_PARAMS_BYTES).
MAX_BODY_BYTES = 4 * 1024 * 1024
API_CSP = "default-src 'none'; frame-ancestors 'none'"
DOCS_PATHS = ("/docs", "/redoc")


def unstorable(text: str) -> bool:
    """Whether ``text`` holds a NUL byte or a lone surrogate."""
    return _UNSTORABLE.search(text) is not None


def _bad_value(value: Any) -> bool:
    if isinstance(value, str):
        return unstorable(value)
    if isinstance(value, list):
        return any(_bad_value(item) for item in value)
    if isinstance(value, dict):
        return any(_bad_value(key) or _bad_value(item) for key, item in value.items())
    return False


def _problem(scope: Scope, body: bytes) -> str | None:
    """Why this request is refused at the edge, or None."""
    if unstorable(scope.get("path", "")):
        return "the path holds a NUL byte or an invalid character"
    query = scope.get("query_string", b"").decode("latin-1")
    for key, value in parse_qsl(query, keep_blank_values=True):
        if unstorable(key) or unstorable(value):
            return f"query parameter {key[:40]!r} holds a NUL byte or an invalid character"
    if not body:
        return None
    headers = dict(scope.get("headers", []))
    content_type = headers.get(b"content-type", b"").decode("latin-1").lower()
    if "json" in content_type:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return "the JSON body is not UTF-8"
        try:
            document = json.loads(text)
        except ValueError:
            return None  # not JSON at all: the route's own validation says so
        if _bad_value(document):
            return "the JSON body holds a NUL byte or a lone surrogate (\\u0000, \\ud800…)"
    elif "x-www-form-urlencoded" in content_type:
        text = body.decode("utf-8", errors="surrogateescape")
        for key, value in parse_qsl(text, keep_blank_values=True):
            if unstorable(key) or unstorable(value):
                return f"form field {key[:40]!r} holds a NUL byte or an invalid character"
    return None


def _security_headers(path: str, ui_csp: str) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"same-origin"),
        (b"x-frame-options", b"DENY"),
    ]
    if path.startswith("/ui"):
        headers += [(b"content-security-policy", ui_csp.encode()), (b"cache-control", b"no-store")]
    elif not path.startswith(DOCS_PATHS):  # the interactive docs load their own scripts
        headers.append((b"content-security-policy", API_CSP.encode()))
    return headers


class Edge:
    """ASGI middleware: the refusals above, and security headers on every response."""

    def __init__(
        self,
        app: ASGIApp,
        ui_csp: str,
        max_body_bytes: int = MAX_BODY_BYTES,
        on_status: Callable[[int], None] | None = None,
    ) -> None:
        self.app = app
        self.ui_csp = ui_csp
        self.max_body_bytes = max_body_bytes
        self.on_status = on_status  # every response's status (the deploy watch's 5xx rate)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = _security_headers(scope.get("path", ""), self.ui_csp)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                if self.on_status is not None:
                    self.on_status(int(message["status"]))
                names = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    header for header in extra if header[0] not in names
                ]
            await send(message)

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away; let the app see it
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await _refuse(send_with_headers, 413, "too_large", "the request body is too large")
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = _problem(scope, body)
        if problem is not None:
            await _refuse(send_with_headers, 422, "invalid_request", problem)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send_with_headers)


async def _refuse(send: Send, status: int, code: str, message: str) -> None:
    payload = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
