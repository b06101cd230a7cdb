"""`pitome-mllm web` in a real headless browser: start the page on loopback on the tiny model, upload a
bundled image, ask, wait for both answers; the visual-token counts shown are ``handle.num_visual_tokens``
of the setting, the merge map is drawn, a bad upload shows a message and the page keeps working.

Needs the ``[web]`` extra, selenium (``[test]``) and Debian's ``chromium`` + ``chromium-driver``. Outside
CI a missing piece skips the tests with the reason; under CI (``CI`` set, as .ci/run does) they fail.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pitome_mllm
from pitome_mllm.runtime.loading import tiny_demo_model
from pitome_mllm.testing.openai_server import FAKE_ANSWER, FAKE_PROMPT_TOKENS, serve_fake_openai
from pitome_mllm.testing.servers import free_port

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "pitome_mllm" / "assets"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# selenium's By.ID and By.CSS_SELECTOR: selenium is imported only once the tools are known to be there.
BY_ID, BY_CSS = "id", "css selector"


def missing_tools() -> list[str]:
    """What the test needs and this environment lacks, each with how to install it."""
    return [
        what
        for what, present in (
            ("gradio (pip install -e '.[web]')", importlib.util.find_spec("gradio") is not None),
            ("selenium (pip install -e '.[test]')", importlib.util.find_spec("selenium") is not None),
            ("chromium (apt-get install chromium)", CHROMIUM is not None),
            ("chromedriver (apt-get install chromium-driver)", CHROMEDRIVER is not None),
        )
        if not present
    ]


@pytest.fixture(scope="module", autouse=True)
def browser_tools():
    """Skip (with the reason) where a tool is missing; fail instead under CI, which installs them all.

    A fixture, not a module-level check: an environment that deselects this module (``-m model_facing``)
    never reaches it.
    """
    missing = missing_tools()
    if missing:
        reason = "the browser test needs " + ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI installs them (.ci/run: apt-get, install.sh --dev --web)", pytrace=False)
        pytest.skip(reason)


MODEL = "tiny-test"
# The page's setting in this test (method, preset at the page's defaults).
TARGET_TOKENS = 24
SECOND_TARGET_TOKENS = 40
COUNT = re.compile(r"(\d+) visual tokens")


def expected_tokens(**settings) -> int:
    """``handle.num_visual_tokens`` of ``settings`` on the page's model."""
    model, processor = tiny_demo_model("test")
    with pitome_mllm.patched(model, processor, method="pitome", preset="reference", **settings) as handle:
        return handle.num_visual_tokens


@contextlib.contextmanager
def web_page(*arguments: str):
    """``pitome-mllm web ARGUMENTS`` on a free loopback port: yields the page's URL (stopped afterwards)."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "pitome_mllm.cli", "web", *arguments, "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
    )
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                break
            lines.append(line)
            if line.startswith("pitome-mllm web:") and " on http" in line:
                break
        else:
            pytest.fail("the page did not come up in 120 s:\n" + "".join(lines))
        assert server.poll() is None, "pitome-mllm web exited:\n" + "".join(lines)
        url = line.rsplit(" on ", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:"), f"the page must bind to loopback by default, got {url}"
        yield url
        assert server.poll() is None, "the server died during the test"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="module")
def page_url():
    """The page of ``pitome-mllm web --model tiny-test``."""
    with web_page("--model", MODEL, "--max-new-tokens", "8") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def text_of(driver, element_id: str) -> str:
    return driver.find_element(BY_ID, element_id).text


def wait_for_text(driver, element_id: str, predicate, timeout: float = 60.0) -> str:
    """The text of ``#element_id`` once ``predicate(text)`` holds."""
    seen: list[str] = []

    def holds(driver) -> str | bool:
        text = text_of(driver, element_id)
        seen.append(text)
        return text if predicate(text) else False

    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(holds)
    except Exception as error:
        raise AssertionError(f"#{element_id} never matched; last text: {seen[-1:]!r}") from error


def set_value(driver, element_id: str, value) -> None:
    field = driver.find_element(BY_CSS, f"#{element_id} input")
    field.clear()
    field.send_keys(str(value))


def upload(driver, path: Path) -> None:
    driver.find_element(BY_CSS, "#upload input[type=file]").send_keys(str(path))


def shown_count(text: str) -> int:
    match = COUNT.search(text)
    assert match, f"no visual-token count in {text!r}"
    return int(match.group(1))


def ask_and_wait(driver, target: int) -> tuple[str, str]:
    """Click Ask and wait until both answers are done with ``target`` tokens on the patched side."""
    driver.find_element(BY_ID, "ask").click()
    patched = wait_for_text(driver, "stats-patched", lambda text: "total" in text and f"{target} visual" in text, 90)
    unpatched = wait_for_text(driver, "stats-unpatched", lambda text: "total" in text)
    return unpatched, patched


def test_the_page_compares_both_models_and_survives_a_bad_upload(page_url, browser, tmp_path, record_property):
    began = time.perf_counter()
    browser.get(page_url)
    wait_for_text(browser, "plan", lambda text: "visual tokens per image" in text)
    record_property("page_load_s", round(time.perf_counter() - began, 2))
    assert "random weights" in browser.page_source

    # Re-plan without running the model: the schedule's count before anything runs.
    set_value(browser, "budget-value", TARGET_TOKENS)
    plan = wait_for_text(browser, "plan", lambda text: text.startswith(f"{TARGET_TOKENS} visual tokens"))
    assert shown_count(plan) == expected_tokens(target_tokens=TARGET_TOKENS)
    # An invalid setting shows the config's own message on the page.
    set_value(browser, "budget-value", -3)
    invalid = wait_for_text(browser, "plan", lambda text: "Invalid setting" in text)
    assert "target_tokens" in invalid
    set_value(browser, "budget-value", TARGET_TOKENS)
    wait_for_text(browser, "plan", lambda text: text.startswith(f"{TARGET_TOKENS} visual tokens"))

    upload(browser, ASSETS / "chelsea.jpg")
    browser.find_element(BY_ID, "question").find_element(BY_CSS, "textarea, input").send_keys(" Describe it.")
    began = time.perf_counter()
    unpatched, patched = ask_and_wait(browser, expected_tokens(target_tokens=TARGET_TOKENS))
    record_property("question_s", round(time.perf_counter() - began, 2))
    assert shown_count(unpatched) == expected_tokens(keep_ratio=1.0)  # nothing merged: the model's own count
    assert shown_count(patched) == expected_tokens(target_tokens=TARGET_TOKENS)
    assert shown_count(unpatched) > shown_count(patched)
    for stats in (unpatched, patched):
        assert "first token" in stats and "KV cache" in stats
    merge_map = browser.find_element(BY_CSS, "#merge-map img")
    assert merge_map.get_attribute("src"), "the merge map is not drawn"
    assert f"{expected_tokens(target_tokens=TARGET_TOKENS)} tokens hold" in text_of(browser, "token-info")

    # A file that is not an image: a message on the page, the server and the page keep going.
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is not an image")
    upload(browser, not_an_image)
    refusal = wait_for_text(browser, "upload-message", lambda text: "Upload refused" in text)
    assert "notes.png" in refusal
    set_value(browser, "budget-value", SECOND_TARGET_TOKENS)
    wait_for_text(browser, "plan", lambda text: text.startswith(f"{SECOND_TARGET_TOKENS} visual tokens"))
    _, patched = ask_and_wait(browser, expected_tokens(target_tokens=SECOND_TARGET_TOKENS))
    assert shown_count(patched) == expected_tokens(target_tokens=SECOND_TARGET_TOKENS)


def test_the_page_streams_the_answer_of_a_running_server(browser):
    with serve_fake_openai() as server_url, web_page("--serve-url", server_url) as url:
        browser.get(url)
        wait_for_text(browser, "plan", lambda text: "server's own setting" in text)
        browser.find_element(BY_ID, "ask").click()
        stats = wait_for_text(browser, "stats-patched", lambda text: "total" in text)
        assert f"{FAKE_PROMPT_TOKENS} prompt tokens" in stats
        assert text_of(browser, "answer-patched") == "".join(FAKE_ANSWER)
        assert "not shown" in text_of(browser, "stats-unpatched")
