"""The web page at / in a real browser (Debian's Chromium, driven by Playwright) against the real
server and model: a fact pushed out of a small window is read back from memory, the page shows
it, and forgetting it removes it.

Screenshots go to tests/web/output/ (MEMCHAT_WEB_OUTPUT overrides); pytest's closing summary
lists them.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.api.support import FACT, filler

if TYPE_CHECKING:
    from tests.web.conftest import WebPage

pytestmark = pytest.mark.slow

QUESTION = "What is my cat called?"
FILLERS = [
    "Tell me a fact about the ocean.",
    "Tell me a fact about mountains.",
    "Tell me a fact about rivers.",
    "Tell me a fact about forests.",
    "Tell me a fact about deserts.",
]


def api(web: WebPage, method: str, path: str, **kw: Any) -> Any:
    r = httpx.request(method, web.server.url + path, timeout=120, **kw)
    assert r.status_code < 400, r.text
    return r.json() if r.content else None


def session_id(page: Page) -> str:
    sid: str = page.evaluate("new URLSearchParams(location.hash.slice(1)).get('session')")
    assert sid
    return sid


def create_session(page: Page, title: str, window: int) -> str:
    page.fill("#new-title", title)
    page.fill("#new-window", str(window))
    page.click("#create-session")
    expect(page.locator("#rename-input")).to_have_value(title)
    expect(page.locator("#composer-input")).to_be_focused()
    return session_id(page)


def send(page: Page, text: str) -> str:
    """Type a message, send it with Enter, wait for the reply and the refresh after it; the
    streamed reply's text."""
    page.evaluate("window.__stream = []")
    box = page.locator("#composer-input")
    box.focus()
    box.fill(text)
    box.press("Enter")
    expect(box).to_have_value("")  # sent
    page.wait_for_function("document.body.dataset.turn === 'idle'")
    expect(page.locator("#error")).to_be_hidden()
    snaps: list[str] = page.evaluate("window.__stream")
    assert snaps, "no streamed text appeared"
    assert len(set(snaps)) >= 2, f"the reply did not stream: {snaps}"
    # the transcript, reloaded from the server, ends with the reply that streamed
    last = page.locator("#transcript li.msg-assistant[data-message-id]").last
    expect(last.locator(".msg-text")).to_have_text(snaps[-1])
    return snaps[-1]


def memory_ids(web: WebPage, sid: str) -> list[int]:
    return [m["message_id"] for m in api(web, "GET", f"/v1/sessions/{sid}/memory")["messages"]]


def test_recall_shows_in_the_heatmap_and_forgetting_removes_it(web: WebPage) -> None:
    page = web.page
    sid = create_session(page, "Pumpkin", window=96)
    page.fill("#max-tokens", "6")
    timings: dict[str, float] = {}

    t = time.monotonic()
    send(page, FACT)
    timings["fact"] = time.monotonic() - t
    fact_item = page.locator("#transcript li.msg-user", has_text=FACT)
    fact_id = int(fact_item.get_attribute("data-message-id") or "")
    expect(fact_item.locator(".badge")).to_have_text("window")

    # a few turns push the fact out of the 96-token window into memory
    mem_item = page.locator(f'#memory-list li[data-message-id="{fact_id}"]')
    for n, text in enumerate(FILLERS, 1):
        t = time.monotonic()
        send(page, text)
        timings[f"filler {n}"] = time.monotonic() - t
        if mem_item.count():
            break
    expect(mem_item).to_be_visible()
    assert fact_id in memory_ids(web, sid)
    expect(mem_item.locator(".mem-text")).to_have_text(FACT)
    expect(mem_item).to_contain_text("age ")
    expect(mem_item).to_contain_text(" tokens")
    strength = int(mem_item.locator("[role=meter]").get_attribute("aria-valuenow") or "0")
    assert 0 < strength <= 100
    expect(fact_item.locator(".badge")).to_have_text("memory")

    # the question: the memory read attends to the fact, and the heatmap shows it
    t = time.monotonic()
    reply = send(page, QUESTION)
    timings["question"] = time.monotonic() - t
    row = page.locator(f'#read-heatmap li.heat-row[data-message-id="{fact_id}"]')
    expect(row).to_be_visible()
    assert float(row.get_attribute("data-weight") or "0") > 0
    expect(row.locator(".heat-text")).to_have_text(FACT)
    assert row.locator(".tok").count() > 0, "no attended tokens shown for the fact"
    expect(mem_item.locator(".read-mark")).to_be_visible()
    shot = web.shot("after-recall.png")
    print(f"\nreply to {QUESTION!r}: {reply!r}; screenshot {shot}; timings {timings}")

    # the band switch shows each band's share, the API's numbers
    read = api(web, "GET", f"/v1/sessions/{sid}/memory/last-read?top_tokens=200")
    fact_read = next(m for m in read["messages"] if m["message_id"] == fact_id)
    for band in ("lower", "middle", "upper"):
        page.check(f'input[name=band][value="{band}"]')
        weight = float(row.get_attribute("data-weight") or "nan")
        assert weight == pytest.approx(fact_read["bands"][band], abs=1e-6), band
    web.shot("after-recall-upper-band.png")
    page.check('input[name=band][value="all"]')

    # explain: what the memory would read for a text (the query endpoint)
    page.fill("#explain-input", QUESTION)
    page.locator("#explain-input").press("Enter")
    explained = page.locator(f'#explain-heatmap li.heat-row[data-message-id="{fact_id}"]')
    expect(explained).to_be_visible()
    web.shot("explain.png")

    # forget the fact: gone from the panel and from the API; the transcript keeps the text
    page.click(f'button[aria-label="Forget message {fact_id}"]')
    expect(mem_item).to_have_count(0)
    assert fact_id not in memory_ids(web, sid)
    expect(fact_item.locator(".badge")).to_have_text("forgotten")
    expect(fact_item.locator(".msg-text")).to_have_text(FACT)
    expect(row.locator(".badge.loc-forgotten")).to_be_visible()  # the past read says so
    web.shot("after-forget.png")


def tab_to(page: Page, element_id: str, limit: int = 40) -> None:
    """Press Tab until the element has the focus."""
    for _ in range(limit):
        if page.evaluate("document.activeElement && document.activeElement.id") == element_id:
            return
        page.keyboard.press("Tab")
    raise AssertionError(f"#{element_id} not reached with Tab")


def test_keyboard_only_on_a_narrow_window(narrow_web: WebPage) -> None:
    page = narrow_web.page
    # create a session with the keyboard alone: Tab to the fields, Enter submits
    tab_to(page, "new-title")
    page.keyboard.type("Keys")
    tab_to(page, "new-window")
    page.keyboard.type("256")
    page.keyboard.press("Enter")
    box = page.locator("#composer-input")
    expect(box).to_be_focused()
    expect(page.locator("#rename-input")).to_have_value("Keys")

    # Shift+Enter: a new line, nothing sent; Enter: sent
    page.keyboard.type("Hello")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("there")
    expect(box).to_have_value("Hello\nthere")
    expect(page.locator("#transcript li.msg-user")).to_have_count(0)
    page.keyboard.press("Enter")
    expect(box).to_have_value("")
    page.wait_for_function("document.body.dataset.turn === 'idle'")
    expect(page.locator("#transcript li.msg-user .msg-text")).to_have_text("Hello\nthere")
    assert len(page.evaluate("window.__stream")) >= 1
    expect(page.locator("#transcript li.msg-assistant[data-message-id]")).to_have_count(1)

    # readable when narrow: nothing wider than the window
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 380, f"the page is {width}px wide in a 380px window"
    narrow_web.shot("narrow.png")


def test_sessions_export_import_errors_and_stop(web: WebPage) -> None:
    page = web.page
    # a session with history (imported through the API: no generation), the fact in memory
    sid = api(web, "POST", "/v1/sessions", json={"title": "History", "window": 96})["id"]
    history = [{"role": "user", "content": FACT}, {"role": "assistant", "content": "Lovely!"}]
    api(web, "POST", f"/v1/sessions/{sid}/messages", json={"messages": history + filler(4)})
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.click(f'#session-list button[data-session-id="{sid}"]')
    expect(page.locator('#memory-list li[data-message-id="1"]')).to_be_visible()

    # rename
    page.fill("#rename-input", "Renamed")
    page.locator("#rename-input").press("Enter")
    expect(page.locator(f'#session-list button[data-session-id="{sid}"]')).to_contain_text(
        "Renamed"
    )
    assert api(web, "GET", f"/v1/sessions/{sid}")["title"] == "Renamed"

    # export (a download), then import it as a new session
    with page.expect_download() as download:
        page.click("#export-session")
    exported = web.output / "export.json"
    download.value.save_as(exported)
    assert json.loads(exported.read_text())["tables"]["messages"]
    page.set_input_files("#import-file", str(exported))
    page.wait_for_function(f"!location.hash.includes({sid!r}) && location.hash.length > 9")
    new_sid = session_id(page)
    expect(page.locator("#rename-input")).to_have_value("Renamed")
    expect(page.locator('#memory-list li[data-message-id="1"]')).to_be_visible()
    assert 1 in memory_ids(web, new_sid)

    # forget all (after a confirmation)
    page.once("dialog", lambda d: d.accept())
    page.click("#forget-all")
    expect(page.locator("#memory-list")).to_contain_text("Nothing remembered")
    assert api(web, "GET", f"/v1/sessions/{new_sid}/memory")["entries"] == 0

    # an API error is shown: a file that is not an export
    bad = web.output / "not-an-export.json"
    bad.write_text('{"format": "something else"}')
    page.set_input_files("#import-file", str(bad))
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error-text")).to_contain_text("invalid export file")
    web.shot("error.png")
    page.click("#error-close")
    expect(page.locator("#error")).to_be_hidden()

    # delete (after a confirmation)
    page.once("dialog", lambda d: d.accept())
    page.click("#delete-session")
    expect(page.locator(f'#session-list button[data-session-id="{new_sid}"]')).to_have_count(0)
    assert httpx.get(f"{web.server.url}/v1/sessions/{new_sid}").status_code == 404
    expect(page.locator("#no-session")).to_be_visible()

    # stop: a long reply stopped after its first tokens is kept as far as it went
    create_session(page, "Stop", window=512)
    page.fill("#max-tokens", "200")
    box = page.locator("#composer-input")
    box.fill("Write a long story about a dragon.")
    box.press("Enter")
    streaming = page.locator("#streaming-reply.streaming .msg-text")
    expect(streaming).not_to_have_text("")
    page.click("#stop")
    page.wait_for_function("document.body.dataset.turn === 'idle'")
    expect(page.locator("#status")).to_contain_text("Stopped")
    shown = page.evaluate("window.__stream")[-1]
    kept = api(web, "GET", f"/v1/sessions/{session_id(page)}/messages")["data"][-1]
    assert kept["role"] == "assistant" and kept["content"].startswith(shown), (kept, shown)
    assert len(kept["content"]) < 400  # stopped well before 200 tokens
    expect(page.locator("#transcript li.msg-assistant[data-message-id] .msg-text")).to_have_text(
        kept["content"]
    )
