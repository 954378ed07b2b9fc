"""`otclip search` answered by a running `otclip serve` of the same index, over loopback: the HTTP API's
GET /search with the command's query, filters and page. Stdlib only (no numpy, FAISS or model): with a
server up, a terminal query costs the interpreter's start and one request."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlencode, urlsplit

from .running_servers import INSTANCE_HEADER, RunningServer
from .search_results import SearchPage

TIMEOUT_S = 10.0  # a server this slow to answer is treated as absent: the command searches itself


def search_remote(server: RunningServer, params: dict) -> SearchPage | None:
    """The server's page for these API parameters (None values are left out, lists repeat the key); None
    when it cannot answer: not listening, another server on its port, an error status (a request the
    server refuses, such as an image it does not list, is then answered by the caller's own search)."""
    sent = {"collection": server.collection, **{k: v for k, v in params.items() if v is not None}}
    url = urlsplit(server.api)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT_S)
    try:
        connection.request("GET", f"{url.path}/search?{urlencode(sent, doseq=True)}")
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()
    if response.status != 200 or response.getheader(INSTANCE_HEADER) != server.instance:
        return None
    try:
        return SearchPage.from_dict(json.loads(body))
    except (ValueError, KeyError, TypeError):
        return None
