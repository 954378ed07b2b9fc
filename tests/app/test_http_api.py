"""The HTTP JSON API beside the UI (#11), over a live server on loopback, with httpx."""

import csv
import io

import httpx
import pytest


@pytest.fixture(scope="module")
def api(live_app):
    with httpx.Client(base_url=f"{live_app}api", timeout=60) as client:
        yield client


def test_search_by_text_returns_results_with_their_links(api):
    body = api.get("/search", params={"q": "a cat", "k": 3}).json()
    top = body["results"][0]
    assert top["path"].endswith("chelsea.jpg") and top["rank"] == 1 and body["next_offset"] == 3
    thumb = api.get(top["thumbnail"].removeprefix("/api"))
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg" and thumb.content[:2] == b"\xff\xd8"
    original = api.get(top["original"].removeprefix("/api"))
    assert original.status_code == 200 and len(original.content) > len(thumb.content) / 10
    item = api.get(f"/items/{top['id']}").json()
    assert item["key"] == top["path"] and item["label"] == "chelsea"


def test_pages_filters_and_csv_are_the_engines(api, live_app):
    first = api.get("/search", params={"q": "a photo", "k": 4}).json()
    second = api.get("/search", params={"q": "a photo", "k": 4, "offset": first["next_offset"]}).json()
    both = api.get("/search", params={"q": "a photo", "k": 8}).json()
    assert [r["path"] for r in first["results"] + second["results"]] == [r["path"] for r in both["results"]]
    learn = api.get("/search", params={"q": "a photo", "k": 20, "where": "source=scikit-learn"}).json()["results"]
    assert sorted(r["label"] for r in learn) == ["china", "flower"]
    table = api.get("/search", params={"q": "a rocket", "k": 2, "format": "csv"})
    rows = list(csv.DictReader(io.StringIO(table.text)))
    assert table.headers["content-type"].startswith("text/csv") and rows[0]["label"] == "rocket" and len(rows) == 2


def test_an_uploaded_image_combines_with_text(api, demo_index):
    rocket = next((demo_index / "data" / "photos").glob("rocket.*"))
    alone = api.post("/search", params={"k": 1}, files={"image": ("r.jpg", rocket.read_bytes(), "image/jpeg")}).json()
    assert alone["results"][0]["label"] == "rocket"
    mixed = api.post("/search", params={"k": 1, "q": "3:a cat"},
                     files={"image": ("r.jpg", rocket.read_bytes(), "image/jpeg")}).json()
    assert mixed["results"][0]["label"] == "chelsea"  # the text outweighs the image
    texts = api.post("/search", params={"k": 1, "target": "texts"}, files={"image": ("r.jpg", rocket.read_bytes())})
    assert "rocket" in texts.json()["results"][0]["text"]
    for weight in ("nan", "inf", "0"):  # NaN and inf had answered no results, in silence; 0 an unweighted image
        refused = api.post("/search", params={"q": "a cat", "image_weight": weight},
                           files={"image": ("r.jpg", rocket.read_bytes(), "image/jpeg")})
        assert refused.status_code == 400 and "a term's weight is a non-zero number" in refused.json()["detail"]


def test_an_uploaded_camera_raw_file_is_decoded_by_libraw(api, demo_index, tmp_path):
    """A RAW file is known by the upload's file name and decoded as `otclip index` decodes one (Pillow took a DNG's
    bytes for a TIFF it could not decode, and a CR3's for no image at all)."""
    from raw_files import write_dng_of

    dng = write_dng_of(next((demo_index / "data" / "photos").glob("rocket.*")), tmp_path / "IMG_2.DNG").read_bytes()
    found = api.post("/search", params={"k": 1}, files={"image": ("IMG_2.DNG", dng, "image/x-adobe-dng")})
    assert found.status_code == 200 and found.json()["results"][0]["label"] == "rocket", found.text


def test_an_indexed_image_may_be_a_term_and_nothing_else(api):
    top = api.get("/search", params={"q": "a rocket", "k": 1}).json()["results"][0]
    like = api.get("/search", params={"q": f"{top['path']} + a photo", "k": 1}).json()["results"][0]
    assert like["path"] == top["path"]
    for probe in ("/etc/passwd", "./app/server.py", "../README.md + sky"):
        refused = api.get("/search", params={"q": probe})
        assert refused.status_code == 400 and "not in the index" in refused.json()["detail"]


def test_bad_requests_are_one_line_400s(api):
    for params, message in (({"q": "cat + "}, "no term"), ({"q": "a cat", "after": "June"}, "--after"),
                            ({}, "give q"), ({"q": "a cat", "where": "year"}, "COLUMN=VALUE"),
                            ({"q": "a cat", "min_width": -5}, "--min-width -5: must not be negative"),
                            ({"q": "a cat", "min_score": "nan"}, "min score nan: expected a cosine")):
        response = api.get("/search", params=params)
        assert response.status_code == 400 and message in response.json()["detail"], response.text
    # wider than any image (beyond SQLite's integers: it was a 500): no results, as for any width no image has
    for side in ("min_width", "min_height"):
        assert api.get("/search", params={"q": "a cat", side: 10**23}).json()["results"] == []
    assert api.get("/search", params={"q": "a cat", "k": 0}).status_code == 422  # FastAPI's own validation
    assert api.get("/items/999999").status_code == 404
    junk = api.post("/search", files={"image": ("x.png", b"not an image")})
    assert junk.status_code == 400 and "not an image" in junk.json()["detail"]


def test_info_and_openapi(api):
    info = api.get("/info").json()
    assert info["model"]["name"] == "effnet-minilm" and info["sides"]["images"]["items"] == 20
    spec = api.get("/openapi.json").json()
    assert {"/search", "/items/{item_id}", "/items/{item_id}/thumbnail", "/info"} <= set(spec["paths"])
    assert api.get("/docs").status_code == 200


def test_serving_several_index_directories_loads_each_model_once(demo_index, tmp_path, default_model):
    """`otclip serve DIR1 DIR2`: one searcher per directory; the second, built with the same model, shares the
    first one's exported towers and, once loaded, its model; names are the folders' (parents' too when alike)."""
    import shutil

    from otclip.app.server import collection_names, open_collections

    for name in ("a", "b"):
        shutil.copytree(demo_index / "index", tmp_path / name / "index")
    searchers = open_collections([tmp_path / "a" / "index", tmp_path / "b" / "index"])
    try:
        assert searchers[0]._text_model is searchers[1]._text_model is not None
        assert searchers[0]._image_model is searchers[1]._image_model is not None
        assert searchers[1].model is searchers[0].model  # the second asks the first to load it
        assert collection_names([s.directory.root for s in searchers]) == ["a/index", "b/index"]
        assert searchers[1].search("a cat", k=1).results[0].label == "chelsea"
    finally:
        for searcher in searchers:
            searcher.close()


def test_a_large_uploaded_photo_is_decoded_as_indexed_photos_are(api, demo_index, default_model, tmp_path):
    """An upload is decoded at the reduced JPEG scale the model needs (draft), as `otclip index` and the
    terminal decode files: the page and the HTTP API score a large photo exactly as the in-process searcher
    scores the same file (a full decode resized by the model gives other vectors), and the page's decode is
    smaller than the photo."""
    from PIL import Image

    from otclip.app.search_app import SearchApp
    from otclip.engine.query_language import Term
    from otclip.engine.search import IndexSearcher

    big = tmp_path / "big.jpg"
    with Image.open(demo_index / "data" / "photos" / "rocket.jpg") as photo:
        photo.convert("RGB").resize((2400, 1800), Image.Resampling.BICUBIC).save(big, quality=92)
    searcher = IndexSearcher(demo_index / "index", model=default_model)
    want = searcher.search_image(str(big), k=5)
    got = api.post("/search", params={"k": 5}, files={"image": ("big.jpg", big.read_bytes(), "image/jpeg")}).json()
    assert [r["path"] for r in got["results"]] == [r.path for r in want]
    assert max(abs(r["score"] - w.score) for r, w in zip(got["results"], want)) < 1e-5
    app = SearchApp(searcher)
    decoded = app.check_image(str(big))  # what the page's searches do with an upload's path
    assert 224 <= min(decoded.size) and decoded.size[0] < 2400
    page = app.search([Term("image", decoded)], k=5).results
    assert max(abs(r.score - w.score) for r, w in zip(page, want)) < 1e-5


def test_serve_refuses_in_one_line_where_it_could_not_listen(live_app, demo_index, capsys):
    """A port a server already listens on, a host that is not this machine's, an out-of-range port, a missing
    index: each one line (exit 2) before Gradio or a model loads, not Gradio's traceback after the loading."""
    from urllib.parse import urlsplit

    from otclip.main import main

    index, taken = demo_index / "index", urlsplit(live_app).port
    for args, message in ((["--port", str(taken)], f"--port {taken}: in use on 127.0.0.1"),
                          (["--host", "192.0.2.1", "--port", "7999"], "--host 192.0.2.1: cannot listen on"),
                          ([demo_index / "missing"], "missing: not an otclip index")):
        assert main(["serve", str(index), *map(str, args)]) == 2
        out, err = capsys.readouterr()
        assert message in err and len(err.splitlines()) == 1 and not out, (out, err)
    with pytest.raises(SystemExit):
        main(["serve", str(index), "--port", "70000"])
    assert "a TCP port is a number from 1 to 65535" in capsys.readouterr().err


def test_an_item_whose_file_has_gone_is_a_404_that_says_so(tmp_path, default_model):
    """An indexed photo moved or deleted since: its original (and, where no display copy was kept, its thumbnail)
    is a 404 naming the file, not "no indexed image has id N" (the item is still in the index)."""
    import shutil

    from fastapi.testclient import TestClient

    from otclip.app.http_api import build_api
    from otclip.app.search_app import SearchApp
    from otclip.engine.sample_photos import write_sample_photos
    from otclip.engine.search import IndexSearcher
    from otclip.indexer.pipeline import index_images

    gallery = write_sample_photos(tmp_path / "gallery")[0].parent
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("chelsea.jpg", "rocket.jpg"):
        shutil.copy(gallery / name, photos / name)
    index_images(photos, tmp_path / "ix", default_model, progress=False, workers=0, query_models=False,
                 thumbnails=False)
    searcher = IndexSearcher(tmp_path / "ix", model=default_model)
    try:
        client = TestClient(build_api({"ix": SearchApp(searcher)}, 10**8))
        top = client.get("/search", params={"q": "a cat", "k": 1}).json()["results"][0]
        assert client.get(f"/items/{top['id']}/original").status_code == 200
        (photos / "chelsea.jpg").unlink()
        for route in ("original", "thumbnail"):
            gone = client.get(f"/items/{top['id']}/{route}")
            assert gone.status_code == 404 and f"{photos / 'chelsea.jpg'} is no longer there" in gone.json()["detail"]
        missing = client.get("/items/999/original")
        assert missing.status_code == 404 and missing.json()["detail"] == "no indexed image has id 999"
    finally:
        searcher.close()


def test_collections_alike_in_name_are_told_apart(demo_index, tmp_path):
    """Two index folders of one name under parents of one name (`c1/p/ix`, `c2/p/ix`) had both been named `p/ix`, and
    the second replaced the first in silence; a folder given twice is one collection."""
    import shutil

    from conftest import free_port

    from otclip.app.server import collection_names, serve

    assert collection_names(["/x/c1/p/ix", "/x/c2/p/ix", "/y/other"]) == ["c1/p/ix", "c2/p/ix", "other"]
    assert collection_names(["/a/ix", "/b/ix", "/ix"]) == ["a/ix", "b/ix", "ix"]
    for parent in ("c1", "c2"):
        shutil.copytree(demo_index / "index", tmp_path / parent / "p" / "ix")
    port = free_port()
    first, second = tmp_path / "c1" / "p" / "ix", tmp_path / "c2" / "p" / "ix"
    ui = serve([first, second, tmp_path / "c1" / "p" / ".." / "p" / "ix"], "127.0.0.1", port, block=False)
    try:
        api = f"http://127.0.0.1:{port}/api"
        assert httpx.get(f"{api}/collections").json() == ["c1/p/ix", "c2/p/ix"]
        for name in ("c1/p/ix", "c2/p/ix"):
            found = httpx.get(f"{api}/search", params={"q": "a cat", "k": 1, "collection": name}).json()["results"]
            assert found[0]["path"].endswith("chelsea.jpg")
    finally:
        ui.close()
