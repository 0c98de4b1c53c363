"""A real browser: headless Debian Chromium, driven by selenium, loads the demo, sends a message, sees the streamed
reply and the routing heatmap, and saves a screenshot in the test's temporary folder. Skipped where Chromium (or its
driver) is not installed; ``.ci/run`` installs both."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
)

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium chromium-driver)"),
    pytest.mark.skipif(CHROMEDRIVER is None, reason="chromedriver is not installed (apt-get install chromium-driver)"),
]


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_browser_sends_a_message_and_sees_the_reply(browser, served_app, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(served_app[1])
    wait = WebDriverWait(browser, 60)
    box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, 'textarea[data-testid="textbox"]')))
    box.send_keys("Hello from the browser")
    box.send_keys(Keys.ENTER)

    user = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, '[data-testid="user"]')))
    assert "Hello from the browser" in user.text
    bot = wait.until(lambda d: [b for b in d.find_elements(By.CSS_SELECTOR, '[data-testid="bot"]') if b.text.strip()])
    # the reply is complete once the routing panel shows this reply's heatmap
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, 'img[src*="routing"]'))
    assert bot[-1].text.strip() and "⚠️" not in bot[-1].text

    shot = tmp_path / "demo.png"
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size[0] >= 1000


def _generation_heads_present() -> bool:
    from unimoe.modeling_unimoe import UniMoEForConditionalGeneration

    return hasattr(UniMoEForConditionalGeneration, "generate_multimodal")


@pytest.mark.skipif(not _generation_heads_present(), reason="needs Step 5 generation heads")
@pytest.mark.parametrize(("kind", "selector"), [("an image", 'img[src*="image_0"]'), ("speech", '[aria-label="Play"]')])
def test_browser_shows_generated_media_in_the_chat(browser, served_app, kind, selector):
    """A reply's files (FileData dicts, so that API clients can download them) show in the chat as an image or an
    audio player."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(served_app[1])
    wait = WebDriverWait(browser, 60)
    box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, 'textarea[data-testid="textbox"]')))
    browser.find_element(By.XPATH, f'//label[.//span[normalize-space()="{kind}"]]').click()
    box.send_keys("Make something")
    box.send_keys(Keys.ENTER)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, 'img[src*="routing"]'))  # the reply is complete
    bot = browser.find_elements(By.CSS_SELECTOR, '[data-testid="bot"]')
    assert any(b.find_elements(By.CSS_SELECTOR, selector) for b in bot), [b.text for b in bot]
