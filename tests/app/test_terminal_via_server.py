"""`otclip search` answered by a running `otclip serve` of the same index (#14): the same page as a search in
the process, without importing numpy, FAISS or a model; a server that cannot answer is passed over."""

import json
import os
import subprocess
import sys

import numpy as np
from conftest import free_port

from otclip.engine.filters import filters_from_strings
from otclip.engine.query_language import Term, format_query, parse_query
from otclip.engine.remote_search import search_remote
from otclip.engine.running_servers import record_server, server_for, servers_dir
from otclip.engine.search import IndexSearcher

HEAVY = ("numpy", "faiss", "torch", "onnxruntime")


def terminal(args: list, cwd) -> tuple[str, str, list[str]]:
    """`otclip ARGS` in a fresh interpreter: stdout, stderr, and which heavy modules it imported."""
    script = (f"import sys\nfrom otclip.main import main\ncode = main({[str(a) for a in args]!r})\n"
              f"print('LOADED', [m for m in {HEAVY!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True,
                          cwd=cwd)
    out = done.stdout
    return out[: out.rindex("LOADED")], done.stderr, eval(out[out.rindex("LOADED") + 6:])


def test_a_running_server_answers_the_terminal_with_the_same_page(live_app, demo_index, default_model):
    index = demo_index / "index"
    assert server_for(index) is not None  # the live server recorded itself when it started listening
    # relative paths (an image term, --under) are the terminal's: resolved before the query leaves it
    query = './data/photos/rocket.jpg + 2:"a launch pad" - clouds'
    flags = ["-k", "4", "--offset", "1", "--under", "data", "--json"]
    out, _, loaded = terminal(["search", index, query, *flags], cwd=demo_index)
    assert loaded == []
    remote = json.loads(out)
    here = IndexSearcher(index, model=default_model).search(
        parse_query(query.replace("./", f"{demo_index}/")), "images", 4, 1, None,
        filters_from_strings(under=str(demo_index / "data")))
    assert [r["path"] for r in remote] == [r.path for r in here.results] and len(remote) == 4
    np.testing.assert_allclose([r["score"] for r in remote], [r.score for r in here.results], atol=1e-5)
    assert [r["rank"] for r in remote] == [2, 3, 4, 5]

    printed, err, loaded = terminal(["search", index, "a cat", "-k", "2"], cwd=demo_index)
    assert loaded == [] and "chelsea.jpg" in printed.splitlines()[0] and "more: --offset 2" in err
    _, _, loaded = terminal(["search", index, "a cat", "-k", "2", "--local"], cwd=demo_index)
    assert "faiss" in loaded  # --local: searched in the process, as without a server


def test_a_server_that_cannot_answer_is_passed_over(live_app, demo_index, tmp_path, capsys, monkeypatch):
    from otclip.main import main

    index = demo_index / "index"
    server = server_for(index)
    rocket = demo_index / "data" / "photos" / "rocket.jpg"
    assert search_remote(server, {"q": format_query([Term("image", str(rocket))]), "k": 1}).results[0].path == str(rocket)
    copy = tmp_path / "rocket.jpg"  # a file the server does not list: it refuses, the terminal decodes it itself
    copy.write_bytes(rocket.read_bytes())
    assert search_remote(server, {"q": format_query([Term("image", str(copy))]), "k": 1}) is None
    assert main(["search", str(index), "--image", str(copy), "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["path"] == str(rocket)
    # another server now on the recorded port (its instance differs), or nothing listening there
    assert search_remote(type(server)(server.api, "another", server.collection), {"q": "a cat"}) is None
    gone = type(server)(f"http://127.0.0.1:{free_port()}/api", server.instance, server.collection)
    assert search_remote(gone, {"q": "a cat"}) is None
    monkeypatch.setattr("otclip.engine.running_servers.server_for", lambda index_dir: gone)
    assert main(["search", str(index), "a cat", "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["path"].endswith("chelsea.jpg")


def test_a_server_closed_in_a_running_process_is_no_longer_offered(live_app, demo_index, default_model):
    """serve(block=False) then close(): the record goes with the server, so the terminal finds the one still up
    (a closed server's record had come first and sent every search to a port nothing answered on)."""
    from otclip.app.server import serve

    index = demo_index / "index"
    port = free_port()
    ui = serve(index, "127.0.0.1", port, block=False, searcher=IndexSearcher(index, model=default_model))
    record = servers_dir() / f"{os.getpid()}-{port}.json"
    assert record.exists()
    ui.close()
    assert not record.exists()
    assert server_for(index).api == f"{live_app}api"


def test_records_of_servers_that_died_are_removed(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(ended.stdout)
    record = record_server("http://127.0.0.1:1/api", 1, "x", {"ix": tmp_path})
    stale = servers_dir() / f"{dead_pid}-1.json"
    stale.write_text(json.dumps({**json.loads(record.read_text()), "pid": dead_pid}))
    record.unlink()
    assert server_for(tmp_path) is None and not stale.exists()
    record = record_server("http://127.0.0.1:1/api", 2, "y", {"ix": tmp_path})
    assert server_for(tmp_path).instance == "y" and record.name == f"{os.getpid()}-2.json"
    record.unlink()
