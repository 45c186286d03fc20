"""Helpers shared by the API tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

ClientFactory = Callable[..., Any]


def sse_events(response: httpx.Response) -> list[tuple[str, Any]]:
    """(event, data) pairs of a Server-Sent Events body; JSON data decoded."""
    events: list[tuple[str, Any]] = []
    event, data = "message", []
    for line in response.iter_lines():
        if line == "":
            if data:
                text = "\n".join(data)
                try:
                    value: Any = json.loads(text)
                except json.JSONDecodeError:
                    value = text
                events.append((event, value))
            event, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    return events


FACT = "My cat is called Pumpkin and she is orange."


def filler(n: int) -> list[dict[str, str]]:
    """n user/assistant exchanges about the sea, to push earlier messages out of the window."""
    out = []
    for i in range(n):
        out.append({"role": "user", "content": f"Tell me fact number {i} about the ocean."})
        out.append({"role": "assistant", "content": "The ocean covers most of the planet."})
    return out
