"""End to end in a real headless Chromium (Debian's chromium + chromium-driver) driven by Selenium."""

import pytest
from browser import needs_chromium, wait_for

pytestmark = needs_chromium


def test_text_query_shows_the_cat_first(browser, live_app, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(live_app)
    box = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#query textarea"))
    box.send_keys("a cat")
    browser.find_element(By.ID, "search").click()
    first = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#t2i-gallery img"))
    caption = wait_for(browser, lambda d: d.find_element(By.ID, "t2i-gallery").text)
    browser.save_screenshot(str(tmp_path / "text-to-image.png"))
    assert first
    drawn = wait_for(browser, lambda d: d.execute_script(  # the tiles came inline with the results, and show
        "const imgs = [...document.querySelectorAll('#t2i-gallery img')];"
        "return imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0) && imgs.map(i => i.src);"))
    assert all(src.startswith("data:image/jpeg;base64,") for src in drawn)
    cat = caption.find("a tabby cat")
    others = [caption.find(c) for c in ("launch pad", "coffee", "astronaut", "horse", "galaxies") if c in caption]
    assert cat >= 0 and others and all(cat < o for o in others)  # the cat's tile comes first


def test_upload_in_image_to_text_shows_the_caption(browser, live_app, demo_index, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(live_app)
    tab = wait_for(browser, lambda d: [b for b in d.find_elements(By.CSS_SELECTOR, "button[role='tab']")
                                       if "Image -> text" in b.text])
    tab[0].click()
    upload = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#i2t-image input[type='file']"))
    upload.send_keys(str(demo_index / "data" / "photos" / "rocket.jpg"))
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#i2t-image img"))
    browser.find_element(By.ID, "i2t-search").click()
    table = wait_for(browser, lambda d: "launch pad" in d.find_element(By.ID, "i2t-texts").text
                     and d.find_element(By.ID, "i2t-texts"))
    browser.save_screenshot(str(tmp_path / "image-to-text.png"))
    rows = [line for line in table.text.splitlines() if "launch pad" in line or "tabby" in line]
    assert "launch pad" in rows[0]


def test_empty_query_shows_a_message(browser, live_app):
    from selenium.webdriver.common.by import By

    browser.get(live_app)
    wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#query textarea"))
    browser.find_element(By.ID, "search").click()
    wait_for(browser, lambda d: "empty query" in d.find_element(By.TAG_NAME, "body").text)



@pytest.mark.parametrize("tab_name,box,button,results,found", [
    ("Image -> image", "i2i-image", "i2i-search", "i2i-gallery", "a tabby cat"),  # chosen in the file chooser
    ("Image -> text", "i2t-image", "i2t-search", "i2t-texts", "tabby"),  # dropped on the box
])
def test_a_camera_raw_file_is_taken_shown_and_searched(browser, live_app, demo_index, tmp_path, tab_name, box, button,
                                                       results, found):
    """A DNG (Chromium gives it no MIME type, and Gradio's image box took only image/* types: the upload never left
    the page), chosen in the file chooser or dropped on the box: the box shows LibRaw's decode and the search finds
    the cat; the chooser offers RAW files (`image_uploads.PAGE_SCRIPT`)."""
    import base64

    from raw_files import write_dng_of
    from selenium.webdriver.common.by import By

    dng = write_dng_of(demo_index / "data" / "photos" / "chelsea.jpg", tmp_path / "IMG_7.DNG")
    browser.get(live_app)
    tab = wait_for(browser, lambda d: [b for b in d.find_elements(By.CSS_SELECTOR, "button[role='tab']")
                                       if tab_name in b.text])
    tab[0].click()
    chooser = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, f"#{box} input[type='file']"))
    if box == "i2i-image":
        browser.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", chooser)
        assert {".dng", ".cr3", ".nef", "image/*"} <= set(chooser.get_attribute("accept").split(","))
        chooser.send_keys(str(dng))
    else:  # as a file manager drops it: no type
        browser.execute_script(
            "const bytes = Uint8Array.from(atob(arguments[1]), c => c.charCodeAt(0));"
            "const files = new DataTransfer(); files.items.add(new File([bytes], 'IMG_7.DNG'));"
            "arguments[0].dispatchEvent(new DragEvent('drop', {bubbles: true, cancelable: true, dataTransfer: files}));",
            chooser, base64.b64encode(dng.read_bytes()).decode())
    src = wait_for(browser, lambda d: d.execute_script(
        "const i = document.querySelector('#' + arguments[0] + ' img'); return i && i.complete && i.naturalWidth > 0"
        " && i.src;", box))
    assert "IMG_7.DNG.jpg" in src
    browser.find_element(By.ID, button).click()
    text = wait_for(browser, lambda d: found in d.find_element(By.ID, results).text and d.find_element(By.ID, results).text)
    browser.save_screenshot(str(tmp_path / f"raw-{button}.png"))
    assert "Error" not in text
