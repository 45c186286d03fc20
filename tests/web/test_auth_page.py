"""The web page against a server with auth on: a 401 shows the API key field; the key pasted
there is kept in the browser and sent as a Bearer header on every request (the page's own fetches
and the streamed chat)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from playwright.sync_api import expect

from tests.web.conftest import MAX_NEW_TOKENS, WINDOW, LiveServer, open_page

if TYPE_CHECKING:
    from playwright.sync_api import Browser

    from app.model import LoadedModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keyed_server(
    lm: LoadedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, str]]:
    """(the real app with auth on, over a fresh SQLite file; a key of the tenant "web")."""
    from app.auth import create_key
    from app.config import Settings
    from app.db import make_sessionmaker
    from app.main import create_app
    from app.serving import serve_in_thread

    url = f"sqlite:///{tmp_path_factory.mktemp('web-auth') / 'memchat.db'}"
    db = make_sessionmaker(url)
    key, _ = create_key(db, "web")
    db.kw["bind"].dispose()
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=url,
        auth_enabled=True,
        window=WINDOW,
        max_new_tokens=MAX_NEW_TOKENS,
        json_logs=False,
        log_level="WARNING",
    )
    app = create_app(settings, lm=lm)
    with serve_in_thread(app) as base:
        yield LiveServer(url=base, app=app), key


def test_the_page_asks_for_a_key_and_keeps_it(
    browser: Browser, keyed_server: tuple[LiveServer, str], output_dir: Path
) -> None:
    server, key = keyed_server
    headers = {"Authorization": f"Bearer {key}"}
    r = httpx.post(f"{server.url}/v1/sessions", json={"title": "Keyed"}, headers=headers)
    assert r.status_code == 201, r.text
    with contextmanager(open_page)(browser, server, output_dir) as web:
        page = web.page
        expect(page.locator("#auth")).to_be_visible()
        expect(page.locator("#error-text")).to_contain_text("API key")
        web.shot("auth-asks-for-a-key.png")
        page.fill("#api-key", "mc_wrong")
        page.click("#use-key")
        expect(page.locator("#error-text")).to_contain_text("invalid or revoked API key")
        expect(page.locator("#auth")).to_be_visible()

        page.fill("#api-key", key)
        page.click("#use-key")
        expect(page.locator("#auth")).to_be_hidden()
        expect(page.locator("#error")).to_be_hidden()
        expect(page.locator("#session-list")).to_contain_text("Keyed")
        assert page.evaluate("localStorage.getItem('memchat.apiKey')") == key

        # kept across a reload; a turn through the page (streamed fetch) carries it too
        page.reload()
        page.wait_for_selector("body[data-ready=true]")
        expect(page.locator("#auth")).to_be_hidden()
        page.click("#session-list button:has-text('Keyed')")
        box = page.locator("#composer-input")
        box.fill("Hello!")
        box.press("Enter")
        page.wait_for_function("document.body.dataset.turn === 'idle'")
        expect(page.locator("#error")).to_be_hidden()
        expect(page.locator("#transcript li.msg-assistant[data-message-id]")).to_have_count(1)
        web.shot("auth-with-key.png")
