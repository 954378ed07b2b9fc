"""A cap on the size of every request body the app's server reads.

Gradio's `max_file_size` bounds uploads to its upload route only: an image sent inline, as a base64 `data:`
URL in a JSON request body, was decoded whatever its size (a 30.7 MB PNG got past the 20 MB limit). This ASGI
middleware refuses, with 413, any body over the limit: from its Content-Length before a byte is read, or,
for a chunked body, as soon as the bytes read pass it.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException


class BodyLimit:
    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # FastAPI's body parsing lets HTTPException through
                    raise HTTPException(413, self._message())
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except HTTPException as exc:
            if exc.status_code != 413 or started:
                raise
            await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps({"detail": self._message()}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _message(self) -> str:
        return f"request body over {self.max_bytes:,} bytes (an image may be 20 MB, base64-encoded included)"
