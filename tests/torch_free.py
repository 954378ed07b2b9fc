"""Running an otclip command in a fresh interpreter and checking that it never imported torch."""

from __future__ import annotations

import json
import subprocess
import sys


def search_json_without_torch(*args: str) -> list[dict]:
    """`otclip search ARGS --json --local` in a child process: its results, after asserting no torch import."""
    script = ("import sys\nfrom otclip.main import main\n"
              f"main({[*args, '--json', '--local']!r})\n"
              "print('TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out[out.rindex("TORCH"):].strip() == "TORCH False"
    return json.loads(out[: out.rindex("TORCH")])
