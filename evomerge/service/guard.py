"""ASGI middleware in front of every route: the request body cap and the bearer token.

Checked before FastAPI reads or validates anything, so an unauthenticated write is a 401 even
when its body is malformed, and an oversized body is a 413 before it is buffered.
"""

from __future__ import annotations

import json
from typing import Any

from evomerge.service.security import Policy, token_ok

OPEN_PATHS = ("/", "/docs", "/openapi.json", "/favicon.ico")  # the page asks for the token


class Guard:
    """Refuse writes without the token (reads too if ``policy.token_for_reads``) and bodies
    over ``policy.max_body`` bytes."""

    def __init__(self, app: Any, policy: Policy) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method, path = scope["method"], scope["path"]
        write = method not in ("GET", "HEAD", "OPTIONS")
        if write or (self.policy.token_for_reads and not _public(path)):
            auth = headers.get("authorization") or _query_token(scope, write)
            if not token_ok(self.policy, auth):
                return await _reply(send, 401, "a bearer token is needed: send 'Authorization: "
                                    "Bearer TOKEN' (the token `evomerge serve` printed, or "
                                    "EVOMERGE_TOKEN)", {"www-authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.policy.max_body):
            return await _reply(send, 413, f"the request body is over {self.policy.max_body} "
                                "bytes; a job YAML is a few kB")
        await self.app(scope, _capped(receive, self.policy.max_body), send)


def _public(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith("/static/")


def _query_token(scope: dict[str, Any], write: bool) -> str | None:
    """``?token=`` for reads only (EventSource cannot send headers); never for writes."""
    if write:
        return None
    from urllib.parse import parse_qs

    token = parse_qs(scope.get("query_string", b"").decode()).get("token")
    return f"Bearer {token[0]}" if token else None


def _capped(receive: Any, limit: int) -> Any:
    """``receive`` that fails a chunked body once it passes ``limit`` bytes."""
    seen = 0

    async def wrapped() -> dict[str, Any]:
        nonlocal seen
        message: dict[str, Any] = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message

    return wrapped


class BodyTooLarge(Exception):
    """A chunked request body passed the cap (the app turns it into a 413)."""


async def _reply(send: Any, status: int, detail: str, extra: dict[str, str] | None = None
                 ) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
