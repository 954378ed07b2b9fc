"""The page's own searches, called as Gradio's page script calls them (an unqueued event: one POST to
`gradio_api/run/predict` with the event's fn_index), against a live server on loopback: tiles come inline
as the kept thumbnails' bytes, and the inputs are still checked by their components."""

import base64
import io
import json
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image

from otclip.app.inline_gallery import inline_gallery, jpeg_data_uri

SETTINGS = [3, -1.0, "", "", "", "", "", "", "any", "score", 0]  # k, min score, filters, order, collapse
SHOWN = None  # the text search's last input, a state: the page sends null (Gradio passes the session's value)


def page_event(url: str, button: str, kind: str = "click") -> dict:
    """The dependency (fn_index, its trigger, queued or not) the page runs when `button` is clicked (or another
    `kind` of event of that component happens)."""
    config = httpx.get(url + "config", timeout=30).json()
    trigger = next(c["id"] for c in config["components"] if c["props"].get("elem_id") == button)
    (event,) = [d for d in config["dependencies"] if [trigger, kind] in [list(t) for t in d["targets"]]]
    return {"fn_index": event["id"], "trigger_id": trigger, "queue": event.get("queue")}


def run(url: str, event: dict, data: list, session: str | None = None) -> list:
    """The event's outputs, called as the page calls it: unqueued, one POST to run/predict; queued, queue/join
    and then the session's event stream (a new session unless one is given)."""
    session = session or uuid.uuid4().hex[:11]
    body = {"data": data, "event_data": None, "fn_index": event["fn_index"], "trigger_id": event["trigger_id"],
            "session_hash": session}
    if event["queue"] is False:
        answer = httpx.post(url + "gradio_api/run/predict", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        return answer.json()["data"]
    joined = httpx.post(url + "gradio_api/queue/join", json=body, timeout=60).json()["event_id"]
    with httpx.stream("GET", url + "gradio_api/queue/data", params={"session_hash": session}, timeout=60) as stream:
        for line in stream.iter_lines():
            message = json.loads(line[5:]) if line.startswith("data:") else {}
            if message.get("event_id") == joined and message.get("msg") == "process_completed":
                assert message["success"], message
                return message["output"]["data"]
    raise AssertionError("the event stream ended without a result")


def decoded(uri: str) -> bytes:
    head, _, data = uri.partition(",")
    assert head == "data:image/jpeg;base64"
    return base64.b64decode(data)


def test_the_page_gets_its_tiles_inline_as_the_kept_thumbnails(live_app, demo_index):
    event = page_event(live_app, "search")
    assert event["queue"] is False  # one request, no queue round trip
    gallery, status = run(live_app, event, ["index", "a cat", *SETTINGS, SHOWN])[:2]
    assert status == "3 results" and "a tabby cat" in gallery[0]["caption"]
    kept = {p.read_bytes() for p in (demo_index / "index" / "thumbnails").glob("*/*.jpg")}
    for tile in gallery:
        assert tile["image"]["path"] is None  # nothing for Gradio to serve, nothing copied into its cache
        assert decoded(tile["image"]["url"]) in kept


@pytest.mark.parametrize("bad,index,message", [(500, 2, "maximum value 50"), ("nowhere", 0, "list of choices"),
                                               ("sideways", 10, "list of choices"), ("", 1, "empty query")])
def test_the_page_search_still_checks_its_inputs(live_app, bad, index, message):
    """k beyond the slider, a collection or an orientation that is not a choice: refused by the component's
    own check, which runs in the event's thread (the event skips Gradio's per-input preprocessing); the
    error is the status line (the page shows no message for an unqueued event's error), nothing else changes."""
    data = ["index", "a cat", *SETTINGS, SHOWN]
    data[index] = bad
    outputs = run(live_app, page_event(live_app, "search"), data)
    assert outputs[1].startswith("**Error:**") and message in outputs[1], outputs[1]
    assert outputs[0] == {"__type__": "update"}  # the gallery left as it was


def test_the_page_buttons_are_updated_only_when_they_change(live_app):
    """"More results" and the CSV button: shown by the first search of a session, left alone by the next (no
    update: Gradio rebuilds a component for each), whose CSV is sent as the button's plain value and holds its
    own results; a search that finds nothing hides the CSV button, the next one that finds shows it again.
    The CSV is served from the server's own results folder, where it was written, not copied into Gradio's
    cache (1.5 ms a search, and the cache kept every copy)."""
    event, session = page_event(live_app, "search"), uuid.uuid4().hex[:11]
    more, csv = run(live_app, event, ["index", "a cat", *SETTINGS, SHOWN], session)[4:6]
    assert more == {"visible": True, "__type__": "update"} and csv["visible"] is True
    first = httpx.get(live_app + "gradio_api/file=" + csv["value"]["path"], timeout=30).text
    written = Path(csv["value"]["path"])
    assert written.parent.name.startswith("otclip-results-") and written.read_text(encoding="utf-8") == first
    more, csv = run(live_app, event, ["index", "a rocket", *SETTINGS, SHOWN], session)[4:6]
    assert more == {"__type__": "update"} and "__type__" not in csv
    second = httpx.get(live_app + "gradio_api/file=" + csv["path"], timeout=30).text
    assert first.splitlines()[0] == second.splitlines()[0] and "cat" in first and "rocket" in second and first != second
    nothing = ["index", "a cat", 3, 1.0, *SETTINGS[2:], SHOWN]  # minimum score 1: no result
    more, csv = run(live_app, event, nothing, session)[4:6]
    assert more == {"visible": False, "__type__": "update"} and csv == {"visible": False, "value": None, "__type__": "update"}
    more, csv = run(live_app, event, ["index", "a cat", *SETTINGS, SHOWN], session)[4:6]
    assert more["visible"] is True and csv["visible"] is True and csv["value"]["path"].endswith(".csv")


def test_image_to_image_page_tiles_are_inline(live_app, demo_index):
    image = upload(live_app, "chelsea.jpg", (demo_index / "data" / "photos" / "chelsea.jpg").read_bytes())
    gallery = run(live_app, page_event(live_app, "i2i-search"), ["index", image, "", *SETTINGS])[0]
    assert "a tabby cat" in gallery[0]["caption"] and all(t["image"]["url"].startswith("data:") for t in gallery)


@pytest.mark.parametrize("name", ["IMG_7.DNG", "IMG_7.heic", "IMG_7.tif"])
def test_an_upload_the_browser_cannot_draw_is_a_query_and_shown_as_a_jpeg(live_app, demo_index, tmp_path, name):
    """The page's image box takes a RAW file Pillow cannot open (a DNG without a preview; a CR3 alike): LibRaw
    decodes it, not Gradio's preprocessing (which refused it). Once uploaded, such a file, a phone's HEIC or a TIFF
    (which Chromium cannot draw either) becomes a JPEG of its decode in the box, which the browser can draw, and a
    search with it finds what the file finds. A JPEG is left as it is."""
    import numpy as np
    import pillow_heif
    from raw_files import write_dng_of

    photo = demo_index / "data" / "photos" / "chelsea.jpg"
    path = tmp_path / name
    if path.suffix == ".DNG":
        write_dng_of(photo, path)
    elif path.suffix == ".heic":
        pillow_heif.from_pillow(Image.open(photo)).save(path, quality=90)
    else:
        Image.open(photo).save(path)
    image = {**upload(live_app, name, path.read_bytes()), "orig_name": name}
    search = page_event(live_app, "i2i-search")
    gallery = run(live_app, search, ["index", image, "", *SETTINGS])[0]
    assert "a tabby cat" in gallery[0]["caption"]
    (shown,) = run(live_app, page_event(live_app, "i2i-image", "upload"), [image])
    assert shown["path"].endswith(name + ".jpg") and shown["url"].endswith(shown["path"])
    jpeg = httpx.get(live_app + "gradio_api/file=" + shown["path"], timeout=30).content
    with Image.open(io.BytesIO(jpeg)) as drawn, Image.open(photo) as original:
        assert drawn.format == "JPEG" and max(drawn.size) <= 1024
        expected = np.asarray(original.convert("L").resize(drawn.size), float).ravel()
        # the scene, as decoded (LibRaw renders a RAW file with its own white balance and brightness)
        assert np.corrcoef(np.asarray(drawn.convert("L"), float).ravel(), expected)[0, 1] > 0.95
    again = run(live_app, search, ["index", shown, "", *SETTINGS])[0]
    # the same first result, and each result's score within 0.02 (a JPEG; near ties below may swap)
    scores = [{c: float(v) for v, c in (t["caption"].split(" · ", 1) for t in tiles)} for tiles in (gallery, again)]
    assert next(iter(scores[1])) == next(iter(scores[0])) == "a tabby cat"
    assert all(abs(v - scores[0][c]) < 0.02 for c, v in scores[1].items() if c in scores[0]), scores
    jpeg_upload = upload(live_app, "chelsea.jpg", photo.read_bytes())  # drawn by any browser: left as it is
    assert run(live_app, page_event(live_app, "i2i-image", "upload"), [jpeg_upload]) == [{"__type__": "update"}]


def test_a_fresh_server_hands_a_heic_upload_over_as_its_file(tmp_path):
    """Gradio's image box opened each upload with Pillow, which learns HEIC only at the app's first decode
    (`images.open_heif`): in a server that had decoded none, a phone's photo uploaded on the page was "cannot identify
    image file" (the in-process tests had taught Pillow HEIC already). Checked in a process of its own."""
    import subprocess
    import sys

    import pillow_heif

    heic = tmp_path / "IMG_1.heic"
    pillow_heif.from_pillow(Image.new("RGB", (64, 48), (200, 30, 40))).save(heic, quality=90)
    script = f"""
import gradio as gr
from gradio.data_classes import FileData
from PIL import Image
from otclip.app.image_uploads import accept_images
with gr.Blocks():
    box = accept_images(gr.Image(type="filepath", image_mode=None), 10**8)
Image.init()
assert "HEIF" not in Image.OPEN, "Pillow knows HEIC already: not a fresh server"
print(box.preprocess(FileData(path={str(heic)!r}, orig_name="IMG_1.heic")))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == str(heic), done.stderr[-2000:]


def test_data_uri_of_a_kept_file_and_of_an_image_made_on_the_fly(tmp_path):
    picture = Image.new("RGB", (900, 300), (200, 30, 40))
    kept = tmp_path / "ab.jpg"
    picture.save(kept, quality=80)
    assert decoded(jpeg_data_uri(kept)) == kept.read_bytes()
    made = tmp_path / "made.jpg"
    made.write_bytes(decoded(jpeg_data_uri(picture)))
    with Image.open(made) as shown:  # encoded as the index's thumbnails: JPEG, longer side 384
        assert shown.format == "JPEG" and shown.size == (384, 128)
        assert max(abs(a - b) for a, b in zip(shown.getpixel((190, 60)), (200, 30, 40))) < 8
    gallery = inline_gallery(visible=False, render=False)
    tiles = gallery.postprocess([(str(kept), "one"), (picture, "two")]).model_dump()
    assert [t["caption"] for t in tiles] == ["one", "two"] and all(t["image"]["path"] is None for t in tiles)


def upload(url: str, name: str, content: bytes) -> dict:
    (uploaded,) = httpx.post(url + "gradio_api/upload", files={"files": (name, content)}, timeout=60).json()
    return {"path": uploaded, "meta": {"_type": "gradio.FileData"}}


def test_image_to_text_on_the_page_and_its_errors(live_app, demo_index):
    event = page_event(live_app, "i2t-search")
    assert event["queue"] is False
    photo = (demo_index / "data" / "photos" / "chelsea.jpg").read_bytes()
    table, status = run(live_app, event, [upload(live_app, "chelsea.jpg", photo), 3, "index"])
    assert table["data"][0][2] == "a tabby cat" and status == ""
    table, status = run(live_app, event, [upload(live_app, "notes.jpg", b"not an image at all"), 3, "index"])
    # the upload named as the user named it (the engine's decoding: Gradio's Pillow check is skipped, `image_uploads`)
    assert table == {"__type__": "update"} and status == "**Error:** notes.jpg: not an image (cannot identify format)", status


@pytest.mark.parametrize("button", ["i2i-search", "i2t-search"])
def test_an_unqueued_image_search_takes_only_uploads(live_app, demo_index, button):
    """The event skips Gradio's preprocessing, not its check that a file payload is an upload: a path to any
    other file (an indexed photo, the metadata store) is refused before the search opens it."""
    event = page_event(live_app, button)
    for target in (demo_index / "data" / "photos" / "chelsea.jpg", demo_index / "index" / "metadata.sqlite"):
        image = {"path": str(target), "meta": {"_type": "gradio.FileData"}}
        data = ["index", image, "", *SETTINGS] if button == "i2i-search" else [image, 3, "index"]
        body = {"data": data, "event_data": None, "fn_index": event["fn_index"], "trigger_id": event["trigger_id"],
                "session_hash": uuid.uuid4().hex[:11]}
        answer = httpx.post(live_app + "gradio_api/run/predict", json=body, timeout=60)
        assert answer.status_code != 200 and "upload" in answer.text and "tabby" not in answer.text, answer.text[:300]


def test_page_csvs_are_kept_an_hour_and_bounded_in_number(tmp_path, monkeypatch, demo_index, default_model):
    """A page's CSV stays downloadable for CSV_KEEP_SECONDS after its search, unless CSV_FILES_KEPT newer ones
    were written since: only then is it deleted."""
    from otclip.app import search_app
    from otclip.engine.search import IndexSearcher

    app = search_app.SearchApp(IndexSearcher(demo_index / "index", model=default_model), csv_dir=tmp_path)
    results = app.searcher.search_text("a cat", k=2)
    clock = [1000.0]
    monkeypatch.setattr(app, "_clock", lambda: clock[0])  # this app's clock only: live servers share the process
    monkeypatch.setattr(search_app, "CSV_FILES_KEPT", 3)
    first = Path(app.csv_file(results))
    clock[0] += search_app.CSV_KEEP_SECONDS - 1
    second = Path(app.csv_file(results))
    assert first.exists() and second.exists()  # younger than an hour
    clock[0] += 2
    third = Path(app.csv_file(results))
    assert not first.exists() and second.exists() and third.exists() and "tabby" in third.read_text(encoding="utf-8")
    latest = [Path(app.csv_file(results)) for _ in range(3)]
    assert sorted(tmp_path.iterdir()) == sorted(latest)  # the three newest only
