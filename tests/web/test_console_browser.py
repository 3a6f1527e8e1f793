"""End-to-end tests of the web console in a real headless browser (Debian's chromium driven by Selenium).

The token flow (asked once, kept in sessionStorage), the dashboard updating after requests, the playground
captioning an uploaded file, and the gallery ranking indexed images with thumbnails and a heatmap overlay.
Screenshots go to `test-artifacts/web/`. Skipped with a reason when selenium, chromium or chromedriver is
missing (CI installs them: `apt-get install -y chromium chromium-driver`).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _web_testlib import ARTIFACTS, WebServer, png_bytes, shape_image

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 45.0


def _executable(names: list[str], candidates: list[str]) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless chromium (one per module; sessionStorage is cleared by the tests that need a fresh start)."""
    binary = _executable(["chromium", "chromium-browser", "google-chrome"], ["/usr/lib/chromium/chromium"])
    driver_path = _executable(["chromedriver"], ["/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver"])
    if binary is None or driver_path is None:
        pytest.skip("chromium and chromedriver are needed (apt-get install -y chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1360,900",
        "--force-device-scale-factor=1",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    except WebDriverException as exc:
        pytest.skip(f"chromium could not be started: {exc.msg}")
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, condition: Callable[[Any], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    """WebDriverWait with a readable failure (and a screenshot of the moment it failed)."""
    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(condition)
    except Exception as exc:
        shot = ARTIFACTS / f"failed-{what.replace(' ', '-')[:40]}.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shot))
        raise AssertionError(f"timed out waiting for {what} (screenshot: {shot})") from exc


def visible(driver: Any, element_id: str) -> bool:
    element = driver.find_element(By.ID, element_id)
    return bool(element.is_displayed())


def open_console(driver: Any, srv: WebServer, view: str = "dashboard") -> None:
    """Load /ui on `view`, giving the token if the page asks for it, and wait until it is connected."""
    driver.get(f"{srv.base}/ui#{view}")
    wait_for(
        driver,
        lambda d: d.execute_script("return document.body.dataset.ready === '1'") or visible(d, "token-dialog"),
        "the console to connect or ask for the token",
    )
    if visible(driver, "token-dialog"):
        driver.find_element(By.ID, "token-input").send_keys(srv.token)
        driver.find_element(By.ID, "token-save").click()
        wait_for(driver, lambda d: d.execute_script("return document.body.dataset.ready === '1'"), "the console")


def severe_errors(driver: Any) -> list[str]:
    """Console errors other than the expected 401 of the first call without a token."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and "status of 401" not in entry["message"]
    ]


def shoot(driver: Any, srv: WebServer, name: str, height: int = 900) -> Path:
    """Save a screenshot of the page from the top (toasts hidden), `height` pixels tall."""
    path = srv.artifacts / name
    driver.execute_script("document.getElementById('toast').hidden = true; window.scrollTo(0, 0);")
    if height != 900:
        driver.set_window_size(1360, height)
    try:
        driver.save_screenshot(str(path))
    finally:
        if height != 900:
            driver.set_window_size(1360, 900)
    assert path.stat().st_size > 10_000
    return path


def send_traffic(srv: WebServer, seconds: float, callers: int = 4) -> int:
    """Concurrent caption and question requests for `seconds` (so the plots have a few seconds of data)."""
    deadline = time.monotonic() + seconds
    count = [0]
    lock = threading.Lock()
    images = [png_bytes(shape_image(i, size=(96, 72))) for i in range(8)]

    started = time.monotonic()

    def caller(k: int) -> None:
        with httpx.Client(base_url=srv.base, timeout=60.0, headers=srv.headers()) as http:
            i = 0
            while time.monotonic() < deadline:
                if int(time.monotonic() - started) % 10 >= 2 + 2 * k:  # 1 to 4 callers: a load that varies
                    time.sleep(0.05)  # pacing the generator, not waiting for a result
                    continue
                image = images[(k + i) % len(images)]
                if i % 3 == 2:
                    r = http.post("/ui/api/answer", params={"question": "what shape is it?"}, content=image)
                else:
                    r = http.post("/ui/api/caption", params={"max_new_tokens": 8}, content=image)
                assert r.status_code == 200, r.text
                with lock:
                    count[0] += 1
                i += 1

    threads = [threading.Thread(target=caller, args=(k,), daemon=True) for k in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 60)
    return count[0]


def canvas_ink(driver: Any, canvas_id: str) -> int:
    """How many pixels of a chart are drawn in a series colour (blue-ish), i.e. whether a line was plotted."""
    return int(
        driver.execute_script(
            """
            const c = document.getElementById(arguments[0]);
            const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 0; i < data.length; i += 4) {
              if (data[i + 3] > 200 && data[i + 2] > 180 && data[i] < 120) n++;
            }
            return n;
            """,
            canvas_id,
        )
    )


def test_token_is_asked_once_and_kept_for_the_tab(browser: Any, web_server: WebServer) -> None:
    srv = web_server
    browser.get(f"{srv.base}/ui")
    browser.execute_script("sessionStorage.clear(); localStorage.clear();")
    browser.get(f"{srv.base}/ui")
    wait_for(browser, lambda d: visible(d, "token-dialog"), "the token dialog")
    browser.find_element(By.ID, "token-input").send_keys("wrong-token-0123456789")
    browser.find_element(By.ID, "token-save").click()
    wait_for(
        browser,
        lambda d: "not accepted" in d.find_element(By.ID, "token-error").text,
        "the wrong token to be refused",
    )
    browser.find_element(By.ID, "token-input").send_keys(srv.token)
    browser.find_element(By.ID, "token-save").click()
    wait_for(browser, lambda d: d.execute_script("return document.body.dataset.ready === '1'"), "the console")
    assert browser.execute_script("return sessionStorage.getItem('blip-token')") == srv.token
    assert browser.execute_script("return localStorage.length") == 0
    assert srv.token not in browser.current_url
    # A reload in the same tab does not ask again.
    browser.refresh()
    wait_for(browser, lambda d: d.execute_script("return document.body.dataset.ready === '1'"), "the reload")
    assert not visible(browser, "token-dialog")
    assert "tiny" in browser.find_element(By.ID, "model-name").text or browser.find_element(By.ID, "model-name").text
    assert severe_errors(browser) == []


def test_dashboard_loads_and_updates_after_requests(browser: Any, web_server: WebServer) -> None:
    srv = web_server
    open_console(browser, srv, "dashboard")
    wait_for(browser, lambda d: d.find_element(By.ID, "dash-updated").text.startswith("updated"), "a first update")
    before = int(browser.find_element(By.ID, "dash-updated").get_attribute("data-requests"))
    # WEB_SCREENSHOT_TRAFFIC_S lengthens the traffic for a README screenshot with a few minutes of plots.
    sent = send_traffic(srv, seconds=float(os.environ.get("WEB_SCREENSHOT_TRAFFIC_S", "4")))
    assert sent >= 8
    wait_for(
        browser,
        lambda d: int(d.find_element(By.ID, "dash-updated").get_attribute("data-requests")) >= before + sent,
        "the dashboard to count the new requests",
    )
    shown = int(browser.find_element(By.ID, "stat-requests").text.replace(",", "").replace("\u202f", ""))
    assert shown >= before + sent
    wait_for(browser, lambda d: canvas_ink(d, "chart-throughput") > 10, "the throughput plot")
    wait_for(browser, lambda d: canvas_ink(d, "chart-latency") > 10, "the latency plot")
    assert "over the window" in browser.find_element(By.ID, "stat-throughput-sub").text
    latency = browser.find_element(By.ID, "stat-latency").text
    assert latency.count("/") == 2 and "–" not in latency
    rows = browser.find_elements(By.CSS_SELECTOR, "#task-table tbody tr")
    assert {r.find_element(By.TAG_NAME, "td").text for r in rows} >= {"caption", "answer"}
    shoot(browser, srv, "dashboard.png", height=1150)
    assert severe_errors(browser) == []


def test_playground_captions_an_uploaded_image(browser: Any, web_server: WebServer, tmp_path: Path) -> None:
    srv = web_server
    upload = tmp_path / "upload-red-circle.png"
    shape_image(0, size=(320, 240)).save(upload)
    open_console(browser, srv, "playground")
    wait_for(browser, lambda d: visible(d, "view-playground"), "the playground")
    before = srv.service.stats().per_task.get("caption")
    captions_before = before.requests if before else 0
    browser.find_element(By.ID, "file-input").send_keys(str(upload))
    wait_for(browser, lambda d: visible(d, "preview"), "the preview")
    assert "upload-red-circle.png" in browser.find_element(By.ID, "file-info").text

    browser.find_element(By.ID, "caption-n").clear()
    browser.find_element(By.ID, "caption-n").send_keys("2")
    browser.find_element(By.ID, "caption-btn").click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#caption-result .line"), "the caption")
    lines = browser.find_elements(By.CSS_SELECTOR, "#caption-result .line")
    assert len(lines) == 2
    assert all(line.find_element(By.CSS_SELECTOR, ".text").text for line in lines)
    assert "confidence" in lines[0].text
    timing = browser.find_element(By.CSS_SELECTOR, "#caption-result .timing").text
    assert "queue" in timing and "320×240" in timing
    caption = browser.find_element(By.ID, "caption-result").get_attribute("data-caption")
    assert caption is not None
    assert srv.service.stats().per_task["caption"].requests == captions_before + 1  # the same service as MCP

    browser.find_element(By.ID, "question").send_keys("what colour is the shape?")
    browser.find_element(By.ID, "ask-btn").click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#answers .line"), "the answer")
    assert "what colour is the shape?" in browser.find_element(By.ID, "answers").text

    browser.find_element(By.ID, "score-btn").click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#score-result .line")) == 3, "the scores")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#score-result .best")) == 1

    browser.find_element(By.ID, "locate-text").send_keys("a red circle")
    browser.find_element(By.ID, "locate-btn").click()
    wait_for(
        browser,
        lambda d: d.execute_script(
            "const i = document.querySelector('#locate-result img'); return !!i && i.complete && i.naturalWidth > 0"
        ),
        "the heatmap overlay",
    )
    shoot(browser, srv, "playground.png", height=1400)
    assert severe_errors(browser) == []


def test_gallery_shows_ranked_results_with_thumbnails_and_heatmap(browser: Any, web_server: WebServer) -> None:
    srv = web_server
    query = "a red circle"
    with srv.client() as http:
        expected = http.get("/ui/api/search", params={"q": query, "top_k": 12}, headers=srv.headers()).json()["hits"]
    assert len(expected) >= 8
    open_console(browser, srv, "gallery")
    box = browser.find_element(By.ID, "search-input")
    box.clear()
    box.send_keys(query)
    browser.find_element(By.ID, "search-btn").click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit")) == len(expected), "results")
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .hit")
    assert [c.get_attribute("data-path") for c in cards] == [h["path"] for h in expected]
    scores = [float(c.get_attribute("data-score")) for c in cards]
    assert scores == sorted(scores, reverse=True)
    assert [c.find_element(By.CSS_SELECTOR, ".rank").text for c in cards[:3]] == ["#1", "#2", "#3"]
    captioned = [c for c in cards if c.get_attribute("data-path").startswith(str(srv.gallery_dir))]
    assert len(captioned) == 8 and all(c.find_element(By.CSS_SELECTOR, ".caption").text for c in captioned)
    wait_for(
        browser,
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results .hit img')]"
            ".every(i => i.complete && i.naturalWidth > 0 && i.src.startsWith('blob:'))"
        ),
        "every thumbnail (fetched with the token, shown as blob URLs)",
    )
    cards[0].click()
    wait_for(browser, lambda d: visible(d, "detail"), "the detail panel")
    browser.find_element(By.ID, "detail-locate").click()
    wait_for(
        browser,
        lambda d: d.execute_script(
            "const i = document.getElementById('detail-overlay'); return !i.hidden && i.complete && i.naturalWidth > 0"
        ),
        "the heatmap overlay for the query",
    )
    assert query in browser.find_element(By.ID, "detail-overlay-caption").text
    shoot(browser, srv, "gallery.png")
    assert severe_errors(browser) == []


def test_playground_refuses_a_file_over_the_limit(browser: Any, web_server: WebServer, tmp_path: Path) -> None:
    srv = web_server
    big = tmp_path / "big.bmp"
    shape_image(2, size=(400, 300)).save(big)  # ~360 kB uncompressed, over the 200 kB limit
    open_console(browser, srv, "playground")
    browser.find_element(By.ID, "file-input").send_keys(str(big))
    wait_for(browser, lambda d: "at most" in d.find_element(By.ID, "toast").text, "the size warning")
