"""The named API endpoints, called with gradio_client against a live server on loopback."""

import pytest
from conftest import free_port
from gradio_client import Client, handle_file


@pytest.fixture(scope="module")
def client(live_app):
    return Client(live_app, verbose=False)


def first_caption(gallery):
    return gallery[0]["caption"]


@pytest.mark.parametrize("query,expected", [("a cat", "a tabby cat"), ("a rocket", "a rocket on the launch pad"),
                                            ("a cup of coffee", "a cup of coffee on a saucer")])
def test_text_to_image_top_result(client, query, expected):
    gallery, status = client.predict(query, 5, -1, api_name="/text_to_image")
    assert expected in first_caption(gallery)
    assert status == "5 results"


def test_image_to_text_and_image_to_image(client, demo_index):
    photo = demo_index / "data" / "photos" / "chelsea.jpg"
    table = client.predict(handle_file(str(photo)), 3, api_name="/image_to_text")
    assert table["data"][0][2] == "a tabby cat"
    gallery, _ = client.predict(handle_file(str(photo)), 3, -1, api_name="/image_to_image")
    assert "a tabby cat" in first_caption(gallery)


def test_a_camera_raw_file_is_an_image_query(client, demo_index, tmp_path):
    """A RAW file is decoded through LibRaw, as `otclip index` decodes it: a DNG with a preview (Pillow takes it for a
    TIFF whose first image is the preview, and could not decode it) and one without (Pillow cannot open it, nor a CR3:
    Gradio's own preprocessing had refused it before the app saw it)."""
    from raw_files import write_dng_of

    for preview in (True, False):
        dng = write_dng_of(demo_index / "data" / "photos" / "chelsea.jpg", tmp_path / f"IMG_{preview}.DNG", preview)
        gallery, _ = client.predict(handle_file(str(dng)), 3, -1, api_name="/image_to_image")
        assert "a tabby cat" in first_caption(gallery)


def test_threshold_with_no_results(client):
    gallery, status = client.predict("a cat", 5, 0.99, api_name="/text_to_image")
    assert gallery == [] and "No results above score 0.99" in status


def test_bad_inputs_get_clear_errors(client, tmp_path):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="empty query"):
        client.predict("   ", 5, -1, api_name="/text_to_image")
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    with pytest.raises(Exception):  # noqa: B017 - Gradio rejects it while decoding, or our check does
        client.predict(handle_file(str(not_image)), 3, api_name="/image_to_text")
    # a path in a query is an image term only if the index lists it: the server neither reads nor probes the file
    with pytest.raises(AppError, match="not in the index"):
        client.predict("/etc/passwd", 3, -1, api_name="/text_to_image")


def test_huge_image_is_refused(client, tmp_path):
    from PIL import Image

    huge = tmp_path / "huge.png"
    Image.new("L", (8000, 6000)).save(huge)
    with pytest.raises(Exception, match="too large"):
        client.predict(handle_file(str(huge)), 3, -1, api_name="/image_to_image")


def test_a_strip_upload_is_refused(client, tmp_path):
    from PIL import Image

    thin = tmp_path / "thin.png"
    Image.new("RGB", (1, 30000)).save(thin)
    with pytest.raises(Exception, match="strip"):
        client.predict(handle_file(str(thin)), 3, -1, api_name="/image_to_image")


def test_an_inline_image_over_the_limit_is_refused_before_it_is_read(live_app):
    """#13 item 2: a base64 `data:` URL in the JSON body got past the 20 MB upload limit (a 30.7 MB PNG)."""
    import base64
    import io

    import httpx
    from PIL import Image

    from otclip.app.server import MAX_BODY

    def call(data_url: str) -> httpx.Response:
        payload = {"data": [{"url": data_url, "meta": {"_type": "gradio.FileData"}}, 3, -1]}
        return httpx.post(f"{live_app}gradio_api/call/image_to_image", json=payload, timeout=60)

    small = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(small, format="PNG")
    accepted = call("data:image/png;base64," + base64.b64encode(small.getvalue()).decode())
    assert accepted.status_code == 200 and "event_id" in accepted.json()  # inline images are accepted at all
    refused = call("data:image/png;base64," + "A" * (MAX_BODY + 1))  # 28.7 MB: a 21.5 MB file, encoded
    assert refused.status_code == 413 and "request body over" in refused.json()["detail"]


def test_the_pixel_limit_is_checked_on_the_header_before_decoding(client, tmp_path):
    """Before, Gradio decoded an uploaded image in full before the app's 40 Mpixel check saw it: a PNG whose
    header says 8000x6000 but whose data is cut short failed in the decoder. Now the header alone refuses it."""
    from PIL import Image

    huge = tmp_path / "huge-cut.png"
    Image.new("L", (8000, 6000)).save(huge)
    huge.write_bytes(huge.read_bytes()[:2000])
    with pytest.raises(Exception, match="8000x6000 is too large"):
        client.predict(handle_file(str(huge)), 3, -1, api_name="/image_to_image")


def test_the_server_does_not_recompute_gradios_monitoring_summary_per_request(demo_index, default_model, monkeypatch,
                                                                              tmp_path):
    """Gradio rebuilds a pandas summary of up to 10,000 past events after every event unless told not to
    (3-8 ms a request): `serve` tells it."""
    import shutil

    from otclip.app.server import serve
    from otclip.engine.search import IndexSearcher

    monkeypatch.setenv("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1")  # remembered as unset: serve's value is undone
    monkeypatch.delenv("GRADIO_ANALYTICS_CACHE_FREQUENCY")
    index = shutil.copytree(demo_index / "index", tmp_path / "index")  # its own: the server records itself for
    port = free_port()  # its index until the process ends, and the terminal tests ask the live app's server
    ui = serve(index, "127.0.0.1", port, block=False, searcher=IndexSearcher(index, model=default_model))
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        for query in ("a cat", "a rocket"):
            client.predict(query, 3, -1, api_name="/text_to_image")
        assert ui._queue.events_recorded >= 2  # the events were counted ...
        assert ui._queue.cached_event_analytics_summary == {"functions": {}}  # ... and never summarised
    finally:
        ui.close()

