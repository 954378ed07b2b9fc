"""Photos that live outside the server's working directory and the system temp directory (an
external disk, /data/photos) show in the app, and still nothing but indexed images is served."""

import tempfile
from io import BytesIO

import httpx
import pytest
from conftest import free_port
from gradio_client import Client, handle_file
from PIL import Image


@pytest.fixture
def app_elsewhere(tmp_path, monkeypatch, default_model):
    """A live server whose cwd and temp directory are both unrelated to the photos' folder."""
    from otclip.app.server import serve
    from otclip.engine.sample_photos import sample_photo
    from otclip.engine.search import IndexSearcher
    from otclip.indexer.pipeline import index_images

    disk = tmp_path / "disk" / "photos"
    disk.mkdir(parents=True)
    for name in ("chelsea", "rocket", "coffee"):
        sample_photo(name).resize((1600, 1200)).save(disk / f"{name}.jpg", quality=95)
    index_images(disk, tmp_path / "index", model=default_model, progress=False)
    (disk / "private.jpg").write_bytes((disk / "coffee.jpg").read_bytes())  # beside them, never indexed
    for folder in ("cwd", "tmp"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    assert not str(disk).startswith(tempfile.gettempdir())
    port = free_port()
    ui = serve(tmp_path / "index", "127.0.0.1", port, block=False,
               searcher=IndexSearcher(tmp_path / "index", model=default_model))
    yield f"http://127.0.0.1:{port}/", disk
    ui.close()


def test_results_show_wherever_the_photos_live(app_elsewhere):
    url, disk = app_elsewhere
    client = Client(url, verbose=False, download_files=False)
    gallery, status = client.predict("a cat", 3, -1, api_name="/text_to_image")
    assert status == "3 results" and "chelsea" in gallery[0]["caption"]
    tile = httpx.get(gallery[0]["image"]["url"], timeout=30)
    assert tile.status_code == 200
    shown = Image.open(BytesIO(tile.content))
    assert shown.format == "JPEG" and max(shown.size) <= 384  # a thumbnail, not the 1600x1200 original

    similar, status = client.predict(handle_file(str(disk / "rocket.jpg")), 2, -1, api_name="/image_to_image")
    assert status == "2 results" and "rocket" in similar[0]["caption"]


@pytest.mark.parametrize("target", ["disk/photos/private.jpg", "disk/photos/chelsea.jpg", "index/metadata.sqlite"])
def test_no_file_is_served_by_path(app_elsewhere, target):
    url, disk = app_elsewhere
    path = disk.parent.parent / target
    assert path.exists()
    for route in (f"gradio_api/file={path}", f"file={path}"):
        assert httpx.get(url + route, timeout=30).status_code in (403, 404)


def test_a_running_server_shows_what_is_indexed_after_it_started(app_elsewhere, default_model):
    from otclip.engine.sample_photos import sample_photo
    from otclip.indexer.pipeline import index_images

    url, disk = app_elsewhere
    client = Client(url, verbose=False, download_files=False)
    gallery, status = client.predict("a cat", 10, -1, api_name="/text_to_image")
    assert status == "3 results"
    sample_photo("astronaut").save(disk / "astronaut.jpg")
    index_images(disk, disk.parent.parent / "index", model=default_model, progress=False)
    gallery, status = client.predict("a cat", 10, -1, api_name="/text_to_image")
    assert status == "4 results" and any("astronaut.jpg" in tile["caption"] for tile in gallery)


def test_tiles_are_the_thumbnails_kept_at_index_time_and_nothing_else_is_served(app_elsewhere):
    url, disk = app_elsewhere
    index = disk.parent.parent / "index"
    kept = sorted((index / "thumbnails").glob("*/*.jpg"))
    assert len(kept) == 3  # one per indexed content, made while indexing
    client = Client(url, verbose=False, download_files=False)
    gallery, _ = client.predict("a cat", 3, -1, api_name="/text_to_image")
    tile = httpx.get(gallery[0]["image"]["url"], timeout=30)
    assert tile.content in {p.read_bytes() for p in kept}  # the kept file itself, not a new encoding
    assert "immutable" in tile.headers["cache-control"]  # named by the content's sha256: browsers keep it
    assert "immutable" not in httpx.get(url + "config", timeout=30).headers.get("cache-control", "")
    thumbs = index / "thumbnails"
    for target in (thumbs / ".." / "metadata.sqlite", thumbs / ".." / ".." / "disk" / "photos" / "private.jpg",
                   disk / "chelsea.jpg", index / "manifest.json"):
        for route in (f"gradio_api/file={target}", f"file={target}"):
            assert httpx.get(url + route, timeout=30).status_code in (403, 404), (route, target)


def test_the_original_route_serves_indexed_images_only(app_elsewhere):
    from otclip.engine.metadata_store import MetadataStore

    url, disk = app_elsewhere
    store = MetadataStore(disk.parent.parent / "index" / "metadata.sqlite", readonly=True)
    found = store.items(list(range(1, 50)))
    store.close()
    by_path = {item["key"]: item_id for item_id, item in found.items() if item["side"] == "images"}
    chelsea = by_path[str(disk / "chelsea.jpg")]
    response = httpx.get(f"{url}api/items/{chelsea}/original", timeout=30)
    assert response.status_code == 200 and response.content == (disk / "chelsea.jpg").read_bytes()
    missing = max(found) + 100
    for bad in (str(missing), "0", "-1", "..%2Fmetadata.sqlite", "1%2F..%2F..%2Fmanifest.json"):
        assert httpx.get(f"{url}api/items/{bad}/original", timeout=30).status_code in (404, 422), bad
