"""The web chat page at ``/`` in headless Chromium (Selenium driving Debian's chromium + chromium-driver), against
uvicorn on a loopback port with a tiny GPT-2: the model's name and the research-use notice, the API key, an
answer that grows while it streams and ends equal to the non-streamed API's, Stop freeing the server's slot,
4xx/429 errors, model and user text shown as text, the completions fallback of a model without a chat
template, and the page's SSE parser fed in every possible split."""

from __future__ import annotations

import os
import shutil
import time

import openai
import pytest

from medfoundry.generation.engine import Engine
from medfoundry.serve.app import ServerConfig
from medfoundry.serve.worker import QueueFull
from test_serve_api import KEY, running_server, wait_idle
from test_serve_engine import gpt2_dir  # noqa: F401  (session fixture: the tiny GPT-2 checkpoint)

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver "
    "(scripts/setup.sh installs them; apt-get install chromium chromium-driver)",
)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

STEP_DELAY_S = 0.05  # per generated token, so that a streamed answer visibly grows
QUESTION = "What does <b>aspirin</b> do? <img src=x onerror=\"document.title='pwned'\">"
LAST_ANSWER = (
    "const m = document.querySelector('#messages .assistant:last-child');"
    "return m ? [m.dataset.state || '', m.querySelector('.content').textContent] : null;"
)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,900"):
        options.add_argument(argument)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(gpt2_dir):
    engine = Engine.load(gpt2_dir, precision="fp32", device="cpu", threads=1, max_batch=2, max_seq_len=128)
    step = engine.step
    engine.step = lambda: (time.sleep(STEP_DELAY_S), step())[1]
    with running_server(engine, ServerConfig(model_name="tiny", api_key=KEY, max_tokens=100), max_queue=2) as (
        url,
        worker,
    ):
        yield url, worker


def wait(driver, condition, seconds: float = 10.0):
    return WebDriverWait(driver, seconds, poll_frequency=0.02).until(lambda d: condition(d))


def by_id(driver, element_id: str):
    return driver.find_element(By.ID, element_id)


def open_chat(driver, url: str, key: str | None = KEY) -> None:
    """Load the page with the API key already in the tab's sessionStorage, and wait until it names the model."""
    driver.get(url)
    driver.execute_script(
        "sessionStorage.clear(); if (arguments[0]) sessionStorage.setItem('medfoundry-api-key', arguments[0]);", key
    )
    driver.refresh()
    wait(driver, lambda d: by_id(d, "model-name").text not in ("", "connecting…"))


def fill(driver, element_id: str, value: str) -> None:
    field = by_id(driver, element_id)
    field.clear()
    field.send_keys(value)


def ask(driver, question: str, *, temperature: str = "0", max_tokens: str) -> None:
    settings = by_id(driver, "settings")
    if settings.get_attribute("open") is None:
        settings.find_element(By.TAG_NAME, "summary").click()
    fill(driver, "temperature", temperature)
    fill(driver, "max-tokens", max_tokens)
    fill(driver, "prompt", question)
    by_id(driver, "send").click()


def watch_answer(driver, seconds: float = 20.0) -> tuple[list[str], str, str]:
    """Poll the last answer until it finishes: (the distinct texts seen while streaming, final state, final text)."""
    seen: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = driver.execute_script(LAST_ANSWER)
        if found and found[0] == "streaming":
            if found[1] and (not seen or seen[-1] != found[1]):
                seen.append(found[1])
        elif found:
            return seen, found[0], found[1]
        time.sleep(0.01)
    raise AssertionError(f"the answer did not finish in {seconds} s (seen {len(seen)} states)")


def test_page_names_the_model_after_the_key_and_shows_the_notice(server, browser):
    url, _ = server
    browser.get(url)
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    notice = by_id(browser, "notice").text
    assert "Research use only" in notice and "Not for medical advice" in notice
    wait(browser, lambda d: by_id(d, "error").is_displayed())
    assert "API key" in by_id(browser, "error").text and by_id(browser, "model-name").text == "not connected"
    assert not by_id(browser, "send").is_enabled()
    assert browser.switch_to.active_element == by_id(browser, "api-key")  # the settings opened on it
    fill(browser, "api-key", KEY)
    by_id(browser, "connect").click()
    wait(browser, lambda d: by_id(d, "model-name").text == "tiny")
    assert not by_id(browser, "error").is_displayed() and by_id(browser, "send").is_enabled()
    assert browser.title.startswith("tiny")
    assert browser.execute_script("return sessionStorage.getItem('medfoundry-api-key')") == KEY
    assert browser.execute_script("return localStorage.length") == 0


def test_answer_streams_into_the_page_and_equals_the_api(server, browser):
    url, _ = server
    open_chat(browser, url)
    ask(browser, QUESTION, max_tokens="24")
    seen, state, text = watch_answer(browser)
    assert state == "done" and text
    assert len(seen) >= 2 and all(text.startswith(partial) for partial in seen), (
        "the answer did not grow while streaming"
    )
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    expected = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24
    )
    assert text == expected.choices[0].message.content
    # the question and the answer are text: nothing in them was parsed as HTML
    assert browser.find_elements(By.CSS_SELECTOR, "#messages .user .content")[-1].text == QUESTION
    assert browser.execute_script("return document.querySelectorAll('#messages .content *').length") == 0
    assert browser.title.startswith("tiny")
    assert not by_id(browser, "stop").is_enabled() and by_id(browser, "send").is_enabled()


def test_stop_aborts_the_stream_and_frees_the_slot(server, browser):
    url, worker = server
    open_chat(browser, url)
    ask(browser, "Describe the pharmacology of statins.", max_tokens="90")  # 90 tokens take > 4.5 s
    wait(browser, lambda d: (d.execute_script(LAST_ANSWER) or ["", ""])[1])
    assert worker.engine.running
    by_id(browser, "stop").click()
    wait(browser, lambda d: d.execute_script(LAST_ANSWER)[0] == "stopped")
    assert wait_idle(worker, seconds=3.0), "the stopped request still holds its slot"
    assert browser.find_elements(By.CSS_SELECTOR, "#messages .assistant .status")[-1].text == "Stopped."
    assert by_id(browser, "send").is_enabled() and not by_id(browser, "error").is_displayed()


def test_errors_are_shown_and_the_question_is_given_back(server, browser, monkeypatch):
    url, worker = server
    open_chat(browser, url)
    ask(browser, "Too long an answer, please.", max_tokens="101")
    wait(browser, lambda d: by_id(d, "error").is_displayed())
    assert "Error 400" in by_id(browser, "error").text and "limit of 100" in by_id(browser, "error").text
    assert by_id(browser, "prompt").get_attribute("value") == "Too long an answer, please."
    assert not browser.find_elements(By.CSS_SELECTOR, "#messages li")

    def busy(_jobs):
        raise QueueFull("server busy: 4 generations in flight; retry later")

    monkeypatch.setattr(worker, "submit", busy)
    ask(browser, "Hello?", max_tokens="4")
    wait(browser, lambda d: "busy" in by_id(d, "error").text)
    assert by_id(browser, "error").get_attribute("role") == "alert"


def test_model_without_chat_template_answers_through_completions(gpt2_dir, tmp_path, browser):
    plain = tmp_path / "no-template"
    shutil.copytree(gpt2_dir, plain)
    (plain / "chat_template.jinja").unlink()
    engine = Engine.load(plain, precision="fp32", device="cpu", threads=1, max_batch=1, max_seq_len=128)
    with running_server(engine, ServerConfig(model_name="plain"), max_queue=2) as (url, _):
        open_chat(browser, url, key=None)  # no key needed: this server has none
        assert by_id(browser, "model-name").text == "plain"
        ask(browser, "What is aspirin?", max_tokens="12")
        _, state, text = watch_answer(browser)
        assert state == "done" and text
        assert "no chat template" in by_id(browser, "mode-note").text and by_id(browser, "mode-note").is_displayed()
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        expected = client.completions.create(
            model="plain",
            prompt="Question: What is aspirin?\nAnswer:",
            stop=["\nQuestion:"],
            temperature=0,
            max_tokens=12,
        )
        assert text == expected.choices[0].text


def test_sse_parser_across_every_chunk_boundary(server, browser):
    """Events with LF, CRLF and CR line ends, a comment, an event field and multi-line data, cut everywhere."""
    url, _ = server
    open_chat(browser, url)
    results = browser.execute_script("""
        const wire = ': keep-alive\\n\\ndata: {"a":1}\\n\\ndata: one\\r\\ndata: two\\r\\n\\r\\n'
                   + 'event: x\\rdata:no space\\r\\rdata: [DONE]\\n\\n';
        const runs = [];
        const parse = (pieces) => {
          const got = [];
          const push = createSSEParser((d) => got.push(d));
          pieces.forEach(push);
          return got;
        };
        for (let i = 0; i <= wire.length; i++)
          for (let j = i; j <= wire.length; j++)
            runs.push(parse([wire.slice(0, i), wire.slice(i, j), wire.slice(j)]));
        runs.push(parse(Array.from(wire)));
        return runs;
    """)
    expected = ['{"a":1}', "one\ntwo", "no space", "[DONE]"]
    assert len(results) > 1000 and all(run == expected for run in results)
