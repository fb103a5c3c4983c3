#!/usr/bin/env python3
"""The web page at `/`, checked in a real browser (headless Debian chromium via selenium).

    page_test.py --base-url http://127.0.0.1:8080 --article tests/fixtures/summit-article.txt \
        --screenshot target/page-screenshot.png [--token T]

Against a running Tidings HTTP server, it:
  1. analyzes the article through the page and checks the results: "Kim Jong Un" is
     highlighted as PER, topic bars, the entity table and the reading facts are shown;
  2. analyzes the article again behind emoji (astral characters, two UTF-16 units each) and
     checks "Kim Jong Un" is still highlighted exactly (code-point offsets converted right);
  3. reaches the first entity with the Tab key and checks its tooltip (aria-label, title and
     the CSS tooltip shown on focus), then saves a full-page screenshot at 1280 px wide;
  4. checks there is no horizontal scrolling at phone width (360 px);
  5. checks an over-long text is refused by the page itself, without a request;
  6. submits an empty text and checks the server's error message is shown (#error).

Prints one PASS/FAIL line per check and a summary; exits 1 if any check failed. Needs
selenium (tests/browser/requirements.txt), /usr/bin/chromium and /usr/bin/chromedriver
(Debian's chromium and chromium-driver); nothing is downloaded.
"""

import argparse
import base64
import json
import pathlib
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.support.ui import WebDriverWait

WAIT_S = 120
EMOJI_PREFIX = "\U0001F4F0\U0001F30F Breaking \U0001F680: "

# Marks whose text is exactly `name`, with their data-label (JS: fast with thousands of marks).
MARKS_NAMED = """
return Array.from(document.querySelectorAll('#highlighted mark.ent'))
  .filter(m => m.textContent === arguments[0]).map(m => m.dataset.label);
"""


class Failed(Exception):
    pass


def check(cond, detail):
    if not cond:
        raise Failed(detail)


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def set_value(driver, element_id, value):
    """Sets a field's value the way typing would end (an input event), without send_keys."""
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input', {bubbles: true}));",
        element_id,
        value,
    )


def error_text(driver):
    return driver.execute_script(
        "const e = document.getElementById('error'); return e.hidden ? '' : e.innerText.trim();"
    )


def analyze(driver, text):
    """Submits `text` with the Analyze button; waits until results or an error are shown."""
    driver.execute_script(
        "document.getElementById('highlighted').replaceChildren();"
        "document.getElementById('results').hidden = true;"
        "document.getElementById('error').hidden = true;"
    )
    set_value(driver, "text", text)
    driver.find_element(By.ID, "analyze").click()
    # Until marks or an error show, or the results show without marks (an article with no
    # entities), then until the busy state ends.
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#highlighted mark.ent")
        or d.find_element(By.ID, "error").is_displayed()
        or d.find_element(By.ID, "results").is_displayed()
    )
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "analyze").is_enabled())


def full_page_screenshot(driver, path):
    try:
        size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        shot = driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 6000), "scale": 1},
            },
        )
        pathlib.Path(path).write_bytes(base64.b64decode(shot["data"]))
    except WebDriverException:
        driver.save_screenshot(str(path))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--article", required=True, type=pathlib.Path)
    ap.add_argument("--screenshot", required=True, type=pathlib.Path)
    ap.add_argument("--token", default="", help="bearer token, if the server requires one")
    args = ap.parse_args()
    base = args.base_url.rstrip("/")
    article = args.article.read_text(encoding="utf-8")
    args.screenshot.parent.mkdir(parents=True, exist_ok=True)
    phone_shot = args.screenshot.with_name(args.screenshot.stem + "-phone.png")

    results = []
    driver = browser()
    try:

        def run(name, fn):
            try:
                detail = fn()
                results.append((name, True, " ".join((detail or "").split())))
                return True
            except Failed as e:
                results.append((name, False, " ".join(str(e).split())))
            except Exception as e:  # noqa: BLE001 (a crash is a failed check, reported)
                results.append((name, False, f"{type(e).__name__}: {e}".strip().splitlines()[0]))
            return False

        def load():
            driver.get(base + "/")
            check(driver.title.startswith("Tidings"), f"unexpected title {driver.title!r}")
            if args.token:
                driver.execute_script(
                    "document.getElementById('settings').open = true;"
                    "const t = document.getElementById('token'); t.value = arguments[0];"
                    "t.dispatchEvent(new Event('change'));",
                    args.token,
                )
            # The server's limits arrive from /v1/info; the footer says when they have.
            WebDriverWait(driver, 30).until(
                lambda d: not d.find_element(By.ID, "server").text.startswith("Connecting")
            )
            return driver.find_element(By.ID, "server").text

        def analysis():
            t0 = time.monotonic()
            analyze(driver, article)
            took = time.monotonic() - t0
            err = error_text(driver)
            check(not err, f"error shown: {err}")
            labels = driver.execute_script(MARKS_NAMED, "Kim Jong Un")
            check("PER" in labels, f"no mark 'Kim Jong Un' with data-label PER (found labels {labels})")
            bars = driver.find_elements(By.CSS_SELECTOR, "#topics .topic-bar")
            check(bars, "no .topic-bar")
            check("%" in bars[0].text and bars[0].text.strip() != "", f"topic bar text {bars[0].text!r}")
            rows = driver.find_elements(By.CSS_SELECTOR, "#groups tbody tr")
            check(rows and len(rows[0].find_elements(By.TAG_NAME, "td")) >= 3, "entity table has no rows")
            facts = driver.find_element(By.ID, "facts").text
            check("tokens" in facts.lower(), f"facts do not mention tokens: {facts!r}")
            marks = driver.execute_script("return document.querySelectorAll('#highlighted mark.ent').length")
            return f"{marks} marks, {len(bars)} topics, {len(rows)} groups, top topic {bars[0].text.splitlines()[0]!r}, {took:.1f} s"

        def astral_offsets():
            analyze(driver, EMOJI_PREFIX + article)
            err = error_text(driver)
            check(not err, f"error shown: {err}")
            labels = driver.execute_script(MARKS_NAMED, "Kim Jong Un")
            check("PER" in labels, "after emoji, no mark is exactly 'Kim Jong Un' (offsets shifted?)")
            text = driver.execute_script("return document.getElementById('highlighted').textContent")
            check(text == EMOJI_PREFIX + article.replace("\r\n", "\n"), "highlighted text differs from the input")
            analyze(driver, article)  # back to the plain article for the screenshot
            check(not error_text(driver), "re-analysis failed")

        def keyboard():
            driver.execute_script("window.scrollTo(0, 0); document.getElementById('analyze').focus();")
            active = None
            for _ in range(25):
                ActionChains(driver).send_keys(Keys.TAB).perform()
                active = driver.switch_to.active_element
                if active.tag_name == "mark" and "ent" in (active.get_attribute("class") or ""):
                    break
            else:
                check(False, f"Tab never reached an entity mark (stopped at <{active.tag_name if active else '?'}>)")
            label = active.get_attribute("data-label")
            aria = active.get_attribute("aria-label") or ""
            title = active.get_attribute("title") or ""
            check(label and label in aria, f"aria-label {aria!r} does not name the type {label!r}")
            check(label in title, f"title {title!r} does not name the type {label!r}")
            tip = driver.execute_script(
                "return getComputedStyle(arguments[0], '::after').getPropertyValue('content')", active
            )
            check(label in tip, f"no CSS tooltip naming {label!r} on focus (::after content {tip!r})")
            outline = driver.execute_script("return getComputedStyle(arguments[0]).outlineStyle", active)
            check(outline not in ("", "none"), "focused mark has no visible outline")
            full_page_screenshot(driver, args.screenshot)
            return f"{active.text!r}: aria-label {aria!r}, tooltip {tip}"

        def phone():
            driver.set_window_size(360, 800)
            emulated = False
            if driver.execute_script("return window.innerWidth") != 360:
                driver.execute_cdp_cmd(
                    "Emulation.setDeviceMetricsOverride",
                    {"width": 360, "height": 800, "deviceScaleFactor": 1, "mobile": True},
                )
                emulated = True
            try:
                driver.execute_script("window.scrollTo(0, document.getElementById('results').offsetTop)")
                time.sleep(0.3)
                width, inner = driver.execute_script(
                    "return [document.documentElement.scrollWidth, window.innerWidth]"
                )
                driver.save_screenshot(str(phone_shot))
                check(inner == 360, f"viewport is {inner} px wide, not 360")
                check(width <= 361, f"page is {width} px wide at 360 px: horizontal scrolling")
            finally:
                if emulated:
                    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
                driver.set_window_size(1280, 1600)
            return f"scrollWidth {width} at {inner} px" + (" (emulated viewport)" if emulated else "")

        def over_limit():
            with urllib.request.urlopen(
                urllib.request.Request(
                    base + "/v1/info", headers={"Authorization": f"Bearer {args.token}"} if args.token else {}
                ),
                timeout=30,
            ) as r:
                limit = int(json.load(r).get("limits", {}).get("maxTextChars", 0))
            check(limit > 0, "/v1/info has no limits.maxTextChars")
            driver.execute_script(
                "window.__posts = 0; const f = window.fetch;"
                "window.fetch = (u, o) => { if (o && o.method === 'POST') window.__posts++; return f(u, o); };"
            )
            set_value(driver, "text", "a" * (limit + 1))
            driver.find_element(By.ID, "analyze").click()
            WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "error").is_displayed())
            posts = driver.execute_script("const n = window.__posts; delete window.__posts; return n")
            check(posts == 0, "an over-long text was sent anyway")
            return error_text(driver)

        def error_shown():
            analyze(driver, "")
            err = error_text(driver)
            check(err, "#error not shown (or empty) after an empty text")
            role = driver.find_element(By.ID, "error").get_attribute("role")
            check(role == "alert", f"#error has role {role!r}, not 'alert'")
            return err

        if run("page loads", load) and run("analysis", analysis):
            run("astral offsets", astral_offsets)
            run("keyboard tooltip", keyboard)
            run("phone width", phone)
        run("over-long text refused", over_limit)
        run("error shown", error_shown)
        if not args.screenshot.exists():
            driver.save_screenshot(str(args.screenshot))
        if not all(ok for _, ok, _ in results):
            for entry in driver.get_log("browser"):
                if entry.get("level") in ("SEVERE", "WARNING"):
                    print(f"  browser console: {entry.get('message')}")
    finally:
        driver.quit()

    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""))
    failed = [name for name, ok, _ in results if not ok]
    shots = ", ".join(str(p) for p in (args.screenshot, phone_shot) if p.exists())
    print(f"page test: {'FAIL' if failed else 'PASS'} ({len(results) - len(failed)}/{len(results)} checks); screenshots: {shots}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
