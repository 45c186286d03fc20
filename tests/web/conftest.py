"""Fixtures of the browser tests: the real server on a free loopback port (real model, SQLite
file) and Debian's Chromium driven by Playwright. Never a browser download: the executable is
the one `apt-get install chromium` puts in /usr/bin (`make browser`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Request

    from app.model import LoadedModel

OUTPUT = Path(os.environ.get("MEMCHAT_WEB_OUTPUT", Path(__file__).parent / "output"))
WINDOW = 96  # the server's default window; the tests make their sessions small anyway
MAX_NEW_TOKENS = 8


def chromium_executable() -> str:
    """Debian's Chromium (MEMCHAT_CHROMIUM overrides); a missing one fails the test."""
    path = os.environ.get("MEMCHAT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail(
            f"Chromium not found at {path}: install Debian's package (`make browser`, i.e. "
            "apt-get install chromium); CI runs the browser tests, they are never skipped.",
            pytrace=False,
        )
    return path


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT, also the page's origin
    app: Any


@pytest.fixture(scope="module")
def live_server(lm: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The real app (uvicorn, in a thread) on a free loopback port, over a fresh SQLite file."""
    from app.config import Settings
    from app.main import create_app
    from app.serving import serve_in_thread

    db = tmp_path_factory.mktemp("web") / "memchat.db"
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=f"sqlite:///{db}",
        window=WINDOW,
        max_new_tokens=MAX_NEW_TOKENS,
        json_logs=False,
        log_level="WARNING",
    )
    app = create_app(settings, lm=lm)
    with serve_in_thread(app) as url:
        yield LiveServer(url=url, app=app)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    executable = chromium_executable()
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


# Records what the streamed reply showed after each change (window.__stream): more than one
# distinct text means the tokens appeared as they came, not all at once.
WATCH_STREAM = """
window.__stream = [];
document.addEventListener("DOMContentLoaded", () => {
  new MutationObserver(() => {
    const e = document.querySelector("#streaming-reply.streaming .msg-text");
    if (e && e.textContent) window.__stream.push(e.textContent);
  }).observe(document.getElementById("transcript"),
             {childList: true, subtree: true, characterData: true});
});
"""


@dataclass
class Recorder:
    """Every request the page made (the test asserts they all stay on the server's origin)."""

    origin: str
    urls: list[str] = field(default_factory=list)

    def __call__(self, request: Request) -> None:
        self.urls.append(request.url)

    def foreign(self) -> list[str]:
        own = urlsplit(self.origin)
        out = []
        for url in self.urls:
            parts = urlsplit(url)
            if parts.scheme in ("data", "blob"):
                continue
            if (parts.scheme, parts.netloc) != (own.scheme, own.netloc):
                out.append(url)
        return out


@dataclass
class WebPage:
    page: Page
    server: LiveServer
    requests: Recorder
    output: Path

    def shot(self, name: str) -> Path:
        path = self.output / name
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture(scope="session")
def output_dir() -> Path:
    """Screenshots and downloads of this run (those of an earlier run are removed)."""
    OUTPUT.mkdir(parents=True, exist_ok=True)
    for old in [*OUTPUT.glob("*.png"), *OUTPUT.glob("*.json")]:
        old.unlink()
    return OUTPUT


def open_page(
    browser: Browser, server: LiveServer, output: Path, width: int = 1360, height: int = 900
) -> Iterator[WebPage]:
    context = browser.new_context(
        viewport={"width": width, "height": height}, accept_downloads=True
    )
    context.set_default_timeout(120_000)  # a turn on a loaded CPU can take a while
    context.add_init_script(WATCH_STREAM)
    recorder = Recorder(server.url)
    context.on("request", recorder)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-ready=true]")
        yield WebPage(page=page, server=server, requests=recorder, output=output)
        assert not errors, f"JavaScript errors on the page: {errors}"
        assert recorder.urls and not recorder.foreign(), recorder.foreign()
    finally:
        context.close()


@pytest.fixture()
def web(browser: Browser, live_server: LiveServer, output_dir: Path) -> Iterator[WebPage]:
    """The page at / in a desktop-sized window."""
    yield from open_page(browser, live_server, output_dir)


@pytest.fixture()
def narrow_web(browser: Browser, live_server: LiveServer, output_dir: Path) -> Iterator[WebPage]:
    """The page at / in a phone-sized window (380 px wide)."""
    yield from open_page(browser, live_server, output_dir, width=380, height=800)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say where the screenshots are."""
    if OUTPUT.is_dir():
        shots = sorted(OUTPUT.glob("*.png"))
        if shots:
            terminalreporter.write_line(f"browser test screenshots in {OUTPUT}:")
            for shot in shots:
                terminalreporter.write_line(f"  {shot}")
