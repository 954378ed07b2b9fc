"""Result tiles that browsers keep: `Cache-Control: immutable` on the thumbnails Gradio serves.

A tile is a file of an index's thumbnails folder named by the sha256 of the image it shows: its bytes never
change under that name, so a browser need not ask for it again. Gradio's file route sends only ETag and
Last-Modified, so a tile shown in an earlier search was fetched again (or revalidated) each time it came back.
Only responses for files inside those folders get the header; everything else Gradio serves is untouched.
"""

from __future__ import annotations

from pathlib import Path

CACHE_CONTROL = b"public, max-age=31536000, immutable"
_FILE_ROUTES = ("/gradio_api/file=", "/file=")


class ImmutableTiles:
    """ASGI middleware: Cache-Control immutable on successful GETs of files inside `folders`."""

    def __init__(self, app, folders: list[str | Path]) -> None:
        self.app = app
        self.folders = [Path(f).resolve() for f in folders]

    def _is_tile(self, path: str) -> bool:
        route = next((r for r in _FILE_ROUTES if path.startswith(r)), None)
        if route is None:
            return False
        try:
            target = Path(path[len(route):]).resolve()
        except (OSError, ValueError):
            return False
        return any(target.is_relative_to(folder) for folder in self.folders)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("GET", "HEAD") or not self._is_tile(scope["path"]):
            await self.app(scope, receive, send)
            return

        async def cached(message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 200:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"cache-control"]
                message = {**message, "headers": [*headers, (b"cache-control", CACHE_CONTROL)]}
            await send(message)

        await self.app(scope, receive, cached)
