"""End to end in a real headless Chromium (Debian's chromium + chromium-driver) driven by Selenium."""

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
