"""Whether a process still runs: what tells a dead writer's leftovers (temporary files, a server's record) from a
live one's, without a lock."""

from __future__ import annotations

import os


def process_exists(pid: int) -> bool:
    """True while `pid` runs (or belongs to another user: it exists, we may just not signal it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
