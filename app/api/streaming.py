"""Generation runs in a worker thread and reaches the event loop through a queue; one SSE helper.

The event loop never waits on a token: the thread produces, the loop awaits the queue. When the
client goes away, the thread is told to stop and closes the turn, which commits what was generated.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse

from app.engine import Turn

_END = object()


class ThreadedTurn:
    """Iterates a Turn in its own thread; ``await next()`` gives the pieces, None at the end, and
    raises what the turn raised (SessionBusy, SessionNotFound, ...)."""

    def __init__(self, turn: Turn) -> None:
        self.turn = turn
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._stop = threading.Event()
        # the copied context carries the request id into the worker's log lines
        ctx = contextvars.copy_context()
        self._thread = threading.Thread(
            target=ctx.run, args=(self._work,), name="memchat-turn", daemon=True
        )
        self._thread.start()

    def _put(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed (server shutting down); the turn still ends
            self._stop.set()

    def _work(self) -> None:
        try:
            for piece in self.turn:
                if self._stop.is_set():
                    self.turn.close()  # commits the reply so far
                    break
                self._put(piece)
            self._put(_END)
        except BaseException as exc:  # handed to the awaiting request
            self._put(exc)

    async def next(self) -> str | None:
        item = await self._queue.get()
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, str)
        return item

    def cancel(self) -> None:
        """Ask the worker to stop after its current token (the turn is then committed)."""
        self._stop.set()

    async def finished(self) -> None:
        """Wait until the worker thread has ended (the turn is committed or rolled back)."""
        await asyncio.to_thread(self._thread.join)


def sse(events: AsyncIterator[dict[str, Any]]) -> EventSourceResponse:
    """A Server-Sent Events response; each item is ``{"event"?: name, "data": str | object}``
    (objects are sent as JSON)."""

    async def encoded() -> AsyncIterator[dict[str, Any]]:
        async for ev in events:
            data = ev["data"]
            yield {**ev, "data": data if isinstance(data, str) else json.dumps(data)}

    return EventSourceResponse(encoded(), sep="\n", ping=15)
