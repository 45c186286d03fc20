"""docker/nginx.conf, the proxy in front of the replicas: checked as text always, and where an
nginx binary is installed (Debian's nginx-light will do) by ``nginx -t`` and by routing requests
to two stand-in backends: one session always reaches the same backend, by its X-Session-Id header
or by the id in its path alike; a dead backend's sessions fail over; streams are not buffered."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "docker" / "nginx.conf"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
)
needs_nginx = pytest.mark.skipif(
    NGINX is None, reason="no nginx binary (apt-get install nginx-light)"
)


def directives(text: str) -> list[str]:
    """The config's statements, comments dropped, whitespace collapsed."""
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    return [" ".join(s.split()) for s in re.split(r"[;{}]", body) if s.strip()]


def test_config_hashes_sessions_consistently() -> None:
    d = directives(CONF.read_text())
    assert "map $http_x_session_id $memchat_session" in d
    assert "map $uri $memchat_path_session" in d
    assert "~^/v1/sessions/(?<sid>[^/]+) $sid" in d  # the id in the path
    assert '"" $memchat_path_session' in d  # no header: the path's session
    assert "default $http_x_session_id" in d
    assert "upstream memchat_app" in d and "hash $memchat_session consistent" in d
    assert any(s.startswith("server app:8000") for s in d)  # the compose service, every replica
    assert "listen 8000" in d and "proxy_pass http://memchat_app" in d
    # SSE streams pass through; big imports fit; failing replicas are skipped
    assert "proxy_buffering off" in d and "proxy_http_version 1.1" in d
    assert "client_max_body_size 256m" in d
    assert any(s.startswith("proxy_next_upstream error") for s in d)
    assert not any("non_idempotent" in s for s in d)  # a POST that reached a replica: not re-sent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _site(backends: list[int], listen: int) -> str:
    """docker/nginx.conf with `app:8000` replaced by local backends and a local listen port."""
    text = CONF.read_text()
    m = re.search(r"^(\s*)server app:8000([^;]*);", text, re.M)
    assert m
    servers = "\n".join(f"{m.group(1)}server 127.0.0.1:{p}{m.group(2)};" for p in backends)
    text = text[: m.start()] + servers + text[m.end() :]
    return text.replace("listen 8000;", f"listen 127.0.0.1:{listen};")


def _main_conf(tmp: Path, site: str) -> Path:
    (tmp / "site.conf").write_text(site)
    for sub in ("logs", "body", "proxy"):
        (tmp / sub).mkdir(exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"daemon off;\nmaster_process off;\npid {tmp}/nginx.pid;\nerror_log {tmp}/logs/error.log;\n"
        "events {}\n"
        f"http {{\n access_log off;\n client_body_temp_path {tmp}/body;\n"
        f" proxy_temp_path {tmp}/proxy;\n include {tmp}/site.conf;\n}}\n"
    )
    return conf


@needs_nginx
def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    assert NGINX
    conf = _main_conf(tmp_path, _site([_free_port()], _free_port()))
    out = subprocess.run(
        [NGINX, "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "test is successful" in out.stderr


class _Backend:
    """A stand-in replica: answers with its name; ``/stream`` sends two chunks 0.6 s apart."""

    def __init__(self, name: str) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self) -> None:
                if self.command == "POST":
                    self.rfile.read(int(self.headers.get("content-length") or 0))
                self.send_response(200)
                self.send_header("X-Backend", outer.name)
                if self.path == "/stream":
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    self.wfile.write(b"data: one\n\n")
                    self.wfile.flush()
                    time.sleep(0.6)
                    self.wfile.write(b"data: two\n\n")
                    return
                body = outer.name.encode()
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _reply  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.name = name
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def proxied(tmp_path: Path) -> Iterator[tuple[str, list[_Backend]]]:
    assert NGINX
    backends = [_Backend("a"), _Backend("b")]
    listen = _free_port()
    conf = _main_conf(tmp_path, _site([b.port for b in backends], listen))
    proc = subprocess.Popen(
        [NGINX, "-p", str(tmp_path), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "nginx did not listen"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{listen}", backends
    finally:
        proc.terminate()
        proc.wait(10)
        for b in backends:
            b.close()


@needs_nginx
def test_nginx_keeps_a_session_on_one_replica(proxied: tuple[str, list[_Backend]]) -> None:
    url, backends = proxied
    sids = [f"session-{i:02d}" for i in range(24)]
    with httpx.Client(base_url=url, timeout=10) as c:
        by_header = {}
        for sid in sids:
            seen = {
                c.get("/v1/models", headers={"X-Session-Id": sid}).headers["x-backend"]
                for _ in range(3)
            }
            assert len(seen) == 1, sid
            by_header[sid] = seen.pop()
        assert set(by_header.values()) == {"a", "b"}  # spread over both
        # the id in the path picks the same replica as the header naming it
        for sid in sids:
            r = c.post(f"/v1/sessions/{sid}/chat", json={"message": "hi"})
            assert r.headers["x-backend"] == by_header[sid], sid
            assert c.get(f"/v1/sessions/{sid}/memory").headers["x-backend"] == by_header[sid]
        # streams are passed on as they come
        t0 = time.monotonic()
        with c.stream("GET", "/stream") as s:
            chunks = s.iter_raw()
            first = next(chunks)
            t_first = time.monotonic() - t0
            rest = b"".join(chunks)
        assert first.startswith(b"data: one") and b"data: two" in first + rest
        assert t_first < 0.5 <= time.monotonic() - t0

        # one replica goes away: its sessions move to the other, POSTs included
        gone = backends[0]
        gone.close()
        for sid in sids:
            r = c.post(f"/v1/sessions/{sid}/chat", json={"message": "hi"})
            assert r.status_code == 200 and r.headers["x-backend"] == "b", sid
