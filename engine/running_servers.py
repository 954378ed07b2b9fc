"""The `otclip serve` processes that are up, and which index directories each serves. A server records
itself in the user's cache dir (`servers/PID-PORT.json`, written atomically) once it listens, and removes
the record when it stops; `otclip search` then asks a live one (`remote_search`) instead of opening the
index and the model itself. Stdlib only: this is on the terminal's fast path."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from .cache_dir import cache_dir
from .processes import process_exists

INSTANCE_HEADER = "X-Otclip-Server"  # a server's search responses carry its instance: a record whose port
# another server took over since is not trusted


@dataclass(frozen=True)
class RunningServer:
    api: str  # the HTTP API's base URL, e.g. http://127.0.0.1:7860/api
    instance: str
    collection: str  # the collection name under which it serves the index directory asked for


def new_instance() -> str:
    return secrets.token_hex(8)


def servers_dir() -> Path:
    return cache_dir() / "servers"


def record_server(api: str, port: int, instance: str, collections: dict[str, Path]) -> Path:
    """Record a listening server: its API URL, pid, instance and each collection's resolved directory."""
    from .atomic_files import write_json_atomically

    return write_json_atomically(servers_dir() / f"{os.getpid()}-{port}.json", {
        "api": api, "pid": os.getpid(), "instance": instance,
        "collections": {name: str(Path(root).resolve()) for name, root in collections.items()}})


def forget_server(record: Path) -> None:
    record.unlink(missing_ok=True)


def server_for(index_dir: str | Path) -> RunningServer | None:
    """A live server's record that serves this index directory, if any (records of dead processes are
    removed on the way)."""
    folder = servers_dir()
    if not folder.is_dir():
        return None
    wanted = str(Path(index_dir).resolve())
    for record in sorted(folder.glob("*.json")):
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
            pid, api, instance, collections = data["pid"], data["api"], data["instance"], data["collections"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not process_exists(pid):
            forget_server(record)
            continue
        for name, root in collections.items():
            if root == wanted:
                return RunningServer(api, instance, name)
    return None

