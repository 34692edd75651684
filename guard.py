"""ASGI middleware at the edge: stamp each request's arrival, cap its body, count and log it."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import HTTPException, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from metrics import Metrics

access_log = logging.getLogger("service.access")
ROUTES = frozenset({"/cls", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"})


async def _answer(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *headers]})
    await send({"type": "http.response.body", "body": body})


def arrival_time(request: Request) -> float:
    """The event-loop time at which the request's first byte reached the app."""
    arrival: float = request.scope["state"]["arrival"]
    return arrival


# Given the scope and the arrival time, a reason to refuse the request now (503), or None to go on.
Admission = Callable[[Scope, float], str | None]


class RequestGuard:
    """Refuse bodies over `max_body_bytes` (413) without reading them whole, and overload (503) before
    reading the body at all; time every request."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, metrics: Metrics, log_requests: bool,
                 admission: Admission | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.log_requests = log_requests
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        arrival = loop.time()
        scope.setdefault("state", {})["arrival"] = arrival
        route = scope["path"] if scope["path"] in ROUTES else "other"
        self.metrics.request_started(route)
        status = 500
        limit = self.max_body_bytes
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # a chunked or lying upload: stop reading here
                    raise HTTPException(413, f"request body over the limit of {limit} bytes")
            return message

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                detail = f"request body of {int(declared)} bytes is over the limit of {limit}"
                await _answer(send_status, 413, detail, [(b"connection", b"close")])
                return
            # Shedding here costs a fraction of a refusal after the multipart body has been parsed;
            # the unread body is discarded by the server and the connection stays usable.
            if self.admission is not None and (refusal := self.admission(scope, arrival)) is not None:
                await _answer(send_status, 503, refusal, [(b"retry-after", b"1")])
                return
            await self.app(scope, limited_receive, send_status)
        finally:
            latency_s = loop.time() - arrival
            self.metrics.request_done(route, status, latency_s)
            if self.log_requests:
                self._log(scope, status, latency_s)

    @staticmethod
    def _log(scope: Scope, status: int, latency_s: float) -> None:
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex
        batch_size = scope["state"].get("batch", {}).get("batch_size")
        latency_ms = round(latency_s * 1000, 2)
        access_log.info("%s %s %d %.2fms batch=%s id=%s", scope["method"], scope["path"], status, latency_ms,
                        batch_size, request_id,
                        extra={"request_id": request_id, "method": scope["method"], "path": scope["path"],
                               "status": status, "latency_ms": latency_ms, "batch_size": batch_size})
