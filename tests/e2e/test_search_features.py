"""#11 in the app, in a real headless Chromium: the query language, filters, "more results", the CSV export, the
collection picker, near-duplicates and phone photos (HEIC/AVIF), over a live server of two collections (and the
same over its HTTP API and the CLI)."""

import csv
import io
import json

import httpx
import pytest
from browser import needs_chromium, wait_for
from conftest import free_port

from gallery import index_demo_photos

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def farm(demo_index, tmp_path_factory, default_model):
    """A second collection of two phone photos: HEIC and AVIF (#11, end to end)."""
    from otclip.indexer.pipeline import index_images

    root = tmp_path_factory.mktemp("farm")
    (root / "photos").mkdir()
    phone_photo(demo_index / "data" / "photos" / "horse.jpg", root / "photos" / "horse.heic")
    phone_photo(demo_index / "data" / "photos" / "camera.jpg", root / "photos" / "camera.avif")
    index_images(root / "photos", root / "farm", default_model, progress=False, workers=0, query_models=False)
    return root


@pytest.fixture(scope="module")
def two_collections(demo_index, farm, default_model):
    from otclip.app.server import serve
    from otclip.engine.search import IndexSearcher

    demo = IndexSearcher(demo_index / "index", model=default_model)
    second = IndexSearcher(farm / "farm", shared_from=demo)
    assert second.model is demo.model  # one model for both
    port = free_port()
    ui = serve([], "127.0.0.1", port, block=False, searchers=[demo, second])
    yield f"http://127.0.0.1:{port}/"
    ui.close()


def phone_photo(jpeg, path):
    """The photo re-encoded as HEIC (pillow-heif) or AVIF (Pillow), as phones save them."""
    from PIL import Image

    picture = Image.open(jpeg).convert("RGB")
    if path.suffix == ".heic":
        import pillow_heif

        pillow_heif.from_pillow(picture).save(path, quality=90)
    else:
        picture.save(path, format="AVIF", quality=90)
    return path


def tiles(browser, gallery="t2i-gallery"):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, gallery).find_elements(By.CSS_SELECTOR, "button img, .thumbnail-item img")


def search(browser, url, query, fields=None):
    from selenium.webdriver.common.by import By

    browser.get(url)
    box = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#query textarea"))
    if fields:
        browser.find_element(By.CSS_SELECTOR, "#filters button, #filters .label-wrap").click()
        for elem_id, value in fields.items():
            field = wait_for(browser, lambda d, elem_id=elem_id: d.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, "
                                                                                f"#{elem_id} input"))
            field.send_keys(value)
    box.send_keys(query)
    browser.find_element(By.ID, "search").click()
    return wait_for(browser, lambda d: "results" in d.find_element(By.ID, "t2i-status").text.lower()
                    and d.find_element(By.ID, "t2i-status").text)


def test_filters_narrow_the_gallery(browser, two_collections):
    status = search(browser, two_collections, "a photo", {"f-label": "rocket"})
    gallery = wait_for(browser, lambda d: "launch pad" in d.find_element("id", "t2i-gallery").text
                       and d.find_element("id", "t2i-gallery"))
    assert status.startswith("1 results") and "tabby" not in gallery.text


def test_more_results_and_the_csv_export(browser, two_collections):
    from selenium.webdriver.common.by import By

    assert search(browser, two_collections, "2:a photo - a drawing").startswith("12 results")
    more = wait_for(browser, lambda d: d.find_element(By.ID, "t2i-more"))
    more.click()
    wait_for(browser, lambda d: d.find_element(By.ID, "t2i-status").text.startswith("20 results"))
    wait_for(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, "#t2i-more:not([style*='none'])")
             or not d.find_element(By.ID, "t2i-more").is_displayed())
    browser.find_element(By.ID, "t2i-csv").click()
    saved = wait_for(browser, lambda d: [p for p in browser.downloads.glob("*.csv")])
    rows = list(csv.DictReader(io.StringIO(saved[0].read_text())))
    assert [int(r["rank"]) for r in rows] == list(range(1, 21))


def examples(browser):
    """The example queries shown; [] while Gradio renders them anew (a button read as it is replaced is stale)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return [b.text.strip() for b in browser.find_elements(By.CSS_SELECTOR, "#examples button") if b.text.strip()]
    except StaleElementReferenceException:
        return []


def test_the_collection_picker_switches_index(browser, two_collections):
    """... and the example queries under the query box: each collection's own (`example_queries`); one fills the box."""
    from selenium.webdriver.common.by import By

    browser.get(two_collections)
    picker = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#collection input"))
    shown = wait_for(browser, examples)
    assert "a cat" in shown and not {"a dress", "a sneaker"} & set(shown)  # sample photos, no clothes
    browser.find_element(By.XPATH, "//*[@id='examples']//button[normalize-space()='a cat']").click()
    box = browser.find_element(By.CSS_SELECTOR, "#query textarea")
    wait_for(browser, lambda d: box.get_attribute("value") == "a cat")
    picker.click()
    option = wait_for(browser, lambda d: [o for o in d.find_elements(By.CSS_SELECTOR, "ul.options li, [role='option']")
                                          if o.text.strip() == "farm"])
    option[0].click()
    farm = wait_for(browser, lambda d: (found := examples(d)) != shown and found)
    assert 1 <= len(farm) <= 2 and "a cat" not in farm  # two photos, a horse and a camera: one example each at most
    box.clear()
    box.send_keys("a camera")
    browser.find_element(By.ID, "search").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "t2i-status").text.startswith("2 results"))


def test_a_page_opened_after_its_collection_grew_offers_the_new_subjects(browser, demo_index, tmp_path, default_model):
    """The example queries were chosen once, as the server started: a watched or re-indexed collection that grew kept
    offering its old subjects until a restart. A page opened after the index's next generation offers the new ones."""
    from otclip.app.server import serve
    from otclip.engine.search import IndexSearcher

    photos = tmp_path / "photos"
    index_demo_photos(demo_index, ["horse.jpg", "camera.jpg"], photos, tmp_path / "ix", default_model)
    port = free_port()
    ui = serve([], "127.0.0.1", port, block=False, searchers=[IndexSearcher(tmp_path / "ix", model=default_model)])
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        before = wait_for(browser, examples)
        assert 1 <= len(before) <= 2 and "a cat" not in before
        index_demo_photos(demo_index, ["chelsea.jpg"], photos, tmp_path / "ix", default_model)
        browser.get(f"http://127.0.0.1:{port}/")
        wait_for(browser, lambda d: "a cat" in examples(d))
    finally:
        ui.close()


def test_the_api_serves_each_collection(two_collections):
    api = f"{two_collections}api"
    assert httpx.get(f"{api}/collections").json() == ["index", "farm"]
    farm = httpx.get(f"{api}/search", params={"q": "a horse", "collection": "farm"}).json()["results"]
    assert [r["path"].rsplit("/", 1)[-1] for r in farm][0] == "horse.heic" and len(farm) == 2
    thumb = httpx.get(f"{two_collections}{farm[0]['thumbnail'].lstrip('/')}")
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
    assert httpx.get(f"{api}/search", params={"q": "a horse", "collection": "zoo"}).status_code == 404


def test_date_order_in_the_app_is_the_apis(browser, two_collections):
    from selenium.webdriver.common.by import By

    browser.get(two_collections)
    wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#query textarea"))
    browser.find_element(By.CSS_SELECTOR, "#filters button, #filters .label-wrap").click()
    choice = wait_for(browser, lambda d: [c for c in d.find_elements(By.CSS_SELECTOR, "#f-order label")
                                          if c.text.strip() == "date"])
    choice[0].click()
    browser.find_element(By.CSS_SELECTOR, "#query textarea").send_keys("a photo")
    browser.find_element(By.ID, "search").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "t2i-status").text.startswith("12 results"))
    shown = [line for line in browser.find_element(By.ID, "t2i-gallery").text.splitlines() if " · " in line]
    api = httpx.get(f"{two_collections}api/search", params={"q": "a photo", "k": 12, "order": "date"}).json()
    expected = [f"{r['score']:.3f} · {r['text']}" for r in api["results"]]
    assert shown == expected and len(set(r["taken"] for r in api["results"])) > 1


def test_near_duplicates_hidden_in_the_app_as_in_the_api(browser, two_collections):
    """The collapse slider: the gallery equals the API's collapsed page, which differs from the plain one."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    api = f"{two_collections}api/search"
    plain = httpx.get(api, params={"q": "a photo", "k": 12}).json()["results"]
    collapsed = httpx.get(api, params={"q": "a photo", "k": 12, "collapse": 0.5}).json()["results"]
    assert [r["id"] for r in collapsed] != [r["id"] for r in plain]  # something near-duplicate was hidden
    browser.get(two_collections)
    wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#query textarea"))
    browser.find_element(By.CSS_SELECTOR, "#filters button, #filters .label-wrap").click()
    number = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#f-collapse input[type='number']"))
    number.send_keys(Keys.CONTROL, "a")
    number.send_keys("0.5", Keys.TAB)
    browser.find_element(By.CSS_SELECTOR, "#query textarea").send_keys("a photo")
    browser.find_element(By.ID, "search").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "t2i-status").text.startswith("12 results"))
    shown = [line for line in browser.find_element(By.ID, "t2i-gallery").text.splitlines() if " · " in line]
    assert shown == [f"{r['score']:.3f} · {r['text']}" for r in collapsed]


def test_phone_photos_are_found_and_are_queries(browser, two_collections, farm, demo_index, tmp_path, capsys):
    """HEIC/AVIF end to end: indexed (the farm collection), found by the CLI and the API, and uploaded as the
    query in the app's image -> text tab."""
    from selenium.webdriver.common.by import By

    from otclip.main import main

    # --local: the CLI's own decoding (a running server of the collection would otherwise answer)
    assert main(["search", str(farm / "farm"), "--image", str(farm / "photos" / "camera.avif"), "--json", "--local"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found[0]["path"].endswith("camera.avif") and found[0]["score"] > 0.99
    rocket = phone_photo(demo_index / "data" / "photos" / "rocket.jpg", tmp_path / "rocket.heic")
    body = httpx.post(f"{two_collections}api/search", params={"k": 1},
                      files={"image": ("rocket.heic", rocket.read_bytes(), "image/heic")}).json()
    assert body["results"][0]["path"].endswith("rocket.jpg")
    browser.get(two_collections)
    tab = wait_for(browser, lambda d: [b for b in d.find_elements(By.CSS_SELECTOR, "button[role='tab']")
                                       if "Image -> text" in b.text])
    tab[0].click()
    upload = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#i2t-image input[type='file']"))
    upload.send_keys(str(rocket))
    drawn = wait_for(browser, lambda d: d.execute_script(  # Chromium cannot draw a HEIC: the box holds a JPEG of it
        "const i = document.querySelector('#i2t-image img'); return i && i.complete && i.naturalWidth > 0 && i.src;"))
    assert drawn.endswith("rocket.heic.jpg")
    browser.find_element(By.ID, "i2t-search").click()
    table = wait_for(browser, lambda d: "launch pad" in d.find_element(By.ID, "i2t-texts").text
                     and d.find_element(By.ID, "i2t-texts"))
    rows = [line for line in table.text.splitlines() if "launch pad" in line or "tabby" in line]
    assert "launch pad" in rows[0]
