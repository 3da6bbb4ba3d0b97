"""One request through the gateway itself, in process: an ASGI scope handed to the app, so the key's budgets and
model list, admission, model resolution, time limits, metrics and the request log apply to a batch line exactly as
to a client's request. The submitter is ``scope["hubserve.principal"]`` (server/ops/auth.py takes it as is);
what answered is read back from ``scope["state"]["request_context"]`` (server/ops/gateway.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

from starlette.types import ASGIApp, Message

from server.ops.context import Principal, RequestContext


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    context: RequestContext | None

    def json_body(self) -> Any:
        """The body as JSON (a string when it is not JSON)."""
        try:
            return json.loads(self.body)
        except ValueError:
            return self.body.decode(errors="replace")


async def call(app: ASGIApp, path: str, payload: dict[str, Any], who: Principal, request_id: str) -> Answer:
    """POST ``payload`` to ``path`` on ``app``. The "client" stays connected until the answer is complete;
    cancelling this call disconnects it (the gateway then aborts the engine's request)."""
    body = json.dumps(payload).encode()
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "client": ("127.0.0.1", 0), "server": ("hubserve-batch", 0), "state": {},
        "headers": [(b"host", b"hubserve-batch"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()), (b"x-request-id", request_id.encode())],
        "hubserve.principal": who,
    }
    complete = asyncio.Event()
    sent_body = False
    status, headers, chunks = 500, {}, []

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await complete.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            headers.update({k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message.get("headers", [])})
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                complete.set()

    try:
        await app(scope, receive, send)
    finally:
        complete.set()
    ctx = scope["state"].get("request_context")
    return Answer(status, headers, b"".join(chunks), ctx if isinstance(ctx, RequestContext) else None)
