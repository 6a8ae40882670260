"""The chat page at `/`: served by the app (no key, no external resources), and, in a real headless Chromium
(playwright), it streams a reply from the server's own endpoint, draws the canvas while it is denoised and ends
with exactly the text the API gives for the same seed.

The browser test is marked `browser` and skips, saying why, where playwright or a Chromium is missing. Under CI
(CI=true) as root with apt, its setup first installs Debian's `chromium` package (a package registry, like PyPI
for playwright, which is in the test extra), so CI runs it for real. With
DGEMMA_WEB_SCREENSHOT=path.png it runs on the bundled default model instead of the tiny random one and saves a
screenshot of a second reply mid-denoising, below the first (docs/web.png is one)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from conftest import running

httpx = pytest.importorskip("httpx")  # the test extra

import dgemma  # noqa: E402
from dgemma.bundled import build_random_model, default_model_path  # noqa: E402
from dgemma.serve import create_app  # noqa: E402

SCREENSHOT = os.environ.get("DGEMMA_WEB_SCREENSHOT")
MODEL = "default" if SCREENSHOT else "tiny"
PROMPT = "Write the Python function is_prime(n) from the math module: Return True if n is prime."
SYSTEM_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return dgemma.load(build_random_model(tmp_path_factory.mktemp("m") / "random"), quiet=True)


@pytest.fixture(scope="module")
def page_engine(engine):
    return dgemma.load(default_model_path(), quiet=True) if SCREENSHOT else engine


def test_the_page_is_served_without_key_and_without_external_resources(engine):
    with running(create_app(engine, model_name=MODEL, api_key="k")) as base:
        r = httpx.get(base + "/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "connect-src 'self'" in r.headers["content-security-policy"]
        page = r.text
        assert "/v1/chat/completions" in page and "dgemma_drafts" in page and "/v1/models" in page
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the page must load nothing external"
        assert not re.search(r"https?://", page)
        assert httpx.get(base + "/v1/models").status_code == 401  # the API itself still needs the key
        assert httpx.get(base + "/nope").status_code == 401


def install_chromium_in_ci() -> str | None:
    """CI only (CI=true, root, apt-get): install Debian's chromium; -> a note of what failed, or None."""
    if os.environ.get("CI") != "true" or any(map(shutil.which, SYSTEM_BROWSERS)):
        return None
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return "CI: cannot install chromium here (needs root and apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                                                  "chromium"]):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"CI: {' '.join(command)} failed: {e}"
        if done.returncode:
            return f"CI: {' '.join(command)} exited {done.returncode}: {done.stderr.strip()[-300:]}"
    return None


def launch_browser(playwright):
    """Playwright's own Chromium if installed (`playwright install chromium`), else a system Chromium."""
    failed = install_chromium_in_ci()
    errors = [failed] if failed else []
    for path in (None, *filter(None, map(shutil.which, SYSTEM_BROWSERS))):
        try:
            return playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        except Exception as e:  # noqa: BLE001  try the next one; report all if none starts
            errors.append(f"{path or 'playwright chromium'}: {str(e).splitlines()[0]}")
    pytest.skip("no Chromium could be started (pip install playwright && playwright install chromium, or apt-get "
                "install chromium): " + "; ".join(errors))


@pytest.mark.browser
def test_the_page_streams_a_reply_in_a_real_browser(page_engine):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    engine, prompt = page_engine, PROMPT if SCREENSHOT else "Hello there"
    settings = {"max_tokens": 150, "seed": 7, "steps": 48 if SCREENSHOT else 6}
    with running(create_app(engine, model_name=MODEL)) as base, sync_api.sync_playwright() as p:
        browser = launch_browser(p)
        try:
            page = browser.new_page(viewport={"width": 960, "height": 640})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + "/")
            page.wait_for_function(f"document.getElementById('model').textContent.startsWith('{MODEL}')")
            for name, value in settings.items():
                page.fill(f"#{name}", str(value))
            page.fill("#prompt", prompt)
            page.press("#prompt", "Enter")
            reply = page.locator(".msg.assistant")
            reply.and_(page.locator("[data-finished]")).wait_for(timeout=60_000)
            assert not errors and reply.locator(".error").count() == 0, (errors, reply.inner_text())
            shown = reply.locator(".done").text_content()
            assert int(reply.get_attribute("data-frames")) >= 1 and int(reply.get_attribute("data-drawn")) >= 1
            assert "tok/s" in reply.locator(".stats").text_content()
            assert reply.locator(".draft").text_content() == ""  # the canvas view is gone once the reply is done
            if SCREENSHOT:
                take_screenshot(page, SCREENSHOT)
        finally:
            browser.close()
    # the same request through the API, without drafts: the page showed exactly the committed answer
    with running(create_app(engine, model_name=MODEL)) as base:
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "seed": settings["seed"],
                "max_tokens": settings["max_tokens"], "max_denoising_steps": settings["steps"]}
        expected = httpx.post(base + "/v1/chat/completions", json=body, timeout=60).json()
    assert shown == expected["choices"][0]["message"]["content"] and shown


def take_screenshot(page, path: str) -> None:
    """A second, longer reply, captured while one of its canvases is being denoised."""
    page.fill("#max_tokens", "512")
    page.fill("#prompt", "Now write is_even(n).")
    page.press("#prompt", "Enter")
    second = page.locator(".msg.assistant").nth(1)
    page.wait_for_function("""() => { const m = document.querySelectorAll('.msg.assistant')[1];
        const f = m && Number(m.querySelector('.canvas').dataset.confident); return f > 0.3 && f < 0.7; }""")
    page.screenshot(path=path)
    second.and_(page.locator("[data-finished]")).wait_for(timeout=120_000)
