"""Serve an app with uvicorn in a background thread of this process (tests, benchmarks, embedding).

``python -m app serve`` is the way to run the server; this is for a caller that already holds a
loaded model and wants the real HTTP stack next to it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


@contextmanager
def serve_in_thread(app: Any, start_timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` on a free port of 127.0.0.1; yields the base URL once the server listens
    (the model may still be loading: poll ``/readyz``) and stops it on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # bound here and handed over: no race for the free port
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_config=None,  # the app's own logging
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="memchat-uvicorn", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server failed to start")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not start within {start_timeout:.0f} s")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
    if thread.is_alive():
        raise RuntimeError("the server did not stop within 30 s")
