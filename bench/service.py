"""Service benchmark: a whole conversation through the HTTP API of a real server.

Starts the app under uvicorn (in a thread, on a free port; the bundled model is loaded as the
server loads it), creates one session and talks to it turn by turn through
``POST /v1/sessions/{id}/chat`` with ``stream: true``: a few facts stated early, small talk, and
questions that refer back to the facts. Per turn, measured on the client with a monotonic clock:
time to the first ``delta`` event, time to the ``done`` event, tokens generated; from the
``done`` event: the server's memory read and write times and the memory size. Prints one JSON
object on stdout (progress on stderr).

    python -m app bench service [--turns 20] [--window 256] [--max-tokens 32]
        [--database-url URL] [--threads N] [--seed 0] [--temperature 0] [--warmup 1]

Database: a temporary SQLite file unless ``--database-url`` names one (the migrations run at
start). Run it alone: other work on the CPUs distorts the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

# Facts first, then small talk and questions that refer back to the facts.
FACTS = [
    "Hi! I'm Maya. I just moved to Lisbon for a new job as a marine biologist.",
    "My sister Clara is visiting next month; she's a pianist from Toronto.",
    "I have a grey cat called Biscuit who hates the rain.",
]
CONVERSATION = [
    "What's a good way to spend a rainy Sunday afternoon?",
    "Any tips for learning Portuguese quickly?",
    "Where do I work, and what do I study?",
    "Can you suggest a simple dinner recipe with fish?",
    "What is my cat's name?",
    "I've started running along the river in the mornings. Is five kilometres a good start?",
    "Who is coming to visit me, and what does she do?",
    "Recommend a book to read on the train.",
    "Which city did I move to?",
    "How should I prepare my flat for a guest staying a week?",
    "What colour is my cat, and what does it dislike?",
    "Tell me a fun fact about octopuses.",
    "Where is my sister from?",
    "What's a nice day trip from the city I live in?",
    "Summarise what you know about me in one sentence.",
    "Thanks for the chat. What was my name again?",
    "Any advice for my first week at the new job?",
]


def conversation(turns: int) -> list[str]:
    """``turns`` user messages: the facts, then the rest, repeated (numbered) when there are
    more turns than messages."""
    base = FACTS + CONVERSATION
    out = []
    for i in range(turns):
        text = base[i % len(base)]
        if i >= len(base):
            text = f"{text} (again, round {i // len(base) + 1})"
        out.append(text)
    return out


def wait_ready(client: httpx.Client, timeout: float = 600.0) -> None:
    """Poll /readyz until 200 (the model loads in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        r = client.get("/readyz")
        if r.status_code == 200:
            return
        checks = r.json().get("checks", {})
        if str(checks.get("model", "")).startswith("failed"):
            raise RuntimeError(f"the model failed to load: {checks['model']}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not ready after {timeout:.0f} s: {checks}")
        time.sleep(0.2)


def sse_events(response: httpx.Response) -> Iterator[tuple[str, Any]]:
    """(event, data) pairs of a Server-Sent Events body as they arrive; JSON data decoded."""
    event = "message"
    data: list[str] = []
    for line in response.iter_lines():
        if line == "":
            if data:
                text = "\n".join(data)
                try:
                    value: Any = json.loads(text)
                except json.JSONDecodeError:
                    value = text
                yield event, value
            event, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def chat_turn(client: httpx.Client, sid: str, message: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed turn, timed on the client; returns its per-turn record."""
    ttft: float | None = None
    deltas = 0
    done: dict[str, Any] | None = None
    t0 = time.monotonic()
    with client.stream(
        "POST", f"/v1/sessions/{sid}/chat", json={"message": message, "stream": True, **body}
    ) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"chat answered {r.status_code}: {r.text}")
        for event, data in sse_events(r):
            if event == "delta":
                if ttft is None:
                    ttft = time.monotonic() - t0
                deltas += 1
            elif event == "done":
                done = data
            elif event == "error":
                raise RuntimeError(f"error event: {data}")
    turn_s = time.monotonic() - t0
    if done is None:
        raise RuntimeError("the stream ended without a done event")
    tokens = int(done["usage"]["completion_tokens"])
    timings = done["timings"]
    decode = (tokens - 1) / (turn_s - ttft) if ttft is not None and tokens > 1 else None
    return {
        "message": message,
        "reply": done["reply"],
        "finish_reason": done["finish_reason"],
        "ttft_s": round(ttft if ttft is not None else turn_s, 4),
        "turn_s": round(turn_s, 4),
        "tokens": tokens,
        "deltas": deltas,
        "tokens_per_s": round(tokens / turn_s, 2),
        "decode_tokens_per_s": round(decode, 2) if decode is not None else None,
        "prompt_tokens": int(done["usage"]["prompt_tokens"]),
        "memory_tokens": int(done["usage"]["memory_tokens"]),
        "memory_tokens_read": int(done["usage"]["memory_tokens_read"]),
        "memory_share": round(float(done["memory_read"]["memory_share"]), 4),
        "server_first_token_s": timings["first_token_s"],
        "server_total_s": timings["total_s"],
        "server_memory_read_s": timings["memory_read_s"],
        "server_memory_write_s": timings["memory_write_s"],
    }


def summary(values: list[float]) -> dict[str, float | None]:
    """p50, p95 (linear interpolation) and mean; None for an empty list."""
    if not values:
        return {"p50": None, "p95": None, "mean": None}
    a = np.asarray(values, dtype=np.float64)
    return {
        "p50": round(float(np.percentile(a, 50)), 4),
        "p95": round(float(np.percentile(a, 95)), 4),
        "mean": round(float(a.mean()), 4),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints the JSON result."""
    ap = argparse.ArgumentParser(prog="bench service", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=20, help="conversation turns measured")
    ap.add_argument("--window", type=int, default=256, help="the session's window in tokens")
    ap.add_argument("--max-tokens", type=int, default=32, help="reply length cap per turn")
    ap.add_argument(
        "--database-url", default=None, help="SQLAlchemy URL (default: a temporary SQLite file)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--seed", type=int, default=0, help="torch seed; turn i sends seed + i")
    ap.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)"
    )
    ap.add_argument(
        "--warmup", type=int, default=1, help="turns on a throwaway session first (not measured)"
    )
    args = ap.parse_args(argv)
    if args.turns < 1 or args.max_tokens < 1:
        ap.error("--turns and --max-tokens must be at least 1")

    import torch

    from app.config import Settings
    from app.main import create_app
    from app.serving import serve_in_thread

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="memchat-bench-") as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'memchat.db'}"
        settings = Settings(
            database_url=url,
            window=args.window,
            max_new_tokens=args.max_tokens,
            threads=args.threads,
            json_logs=False,
            log_level="WARNING",
        )
        app = create_app(settings)  # no model given: the server loads it, as in production
        with serve_in_thread(app) as base, httpx.Client(base_url=base, timeout=600) as client:
            print(f"server on {base}; loading the model", file=sys.stderr)
            t_load = time.monotonic()
            wait_ready(client)
            load_s = time.monotonic() - t_load
            model = client.get("/v1/models").json()["data"][0]["id"]
            print(f"ready in {load_s:.1f} s ({model})", file=sys.stderr)
            body = {"max_tokens": args.max_tokens, "temperature": args.temperature}

            for i in range(args.warmup):
                wid = client.post("/v1/sessions", json={"title": "bench warm-up"}).json()["id"]
                chat_turn(client, wid, "Hello! How are you today?", body)
                client.delete(f"/v1/sessions/{wid}")
                print(f"warm-up {i + 1}/{args.warmup} done", file=sys.stderr)

            r = client.post("/v1/sessions", json={"title": "bench service", "window": args.window})
            r.raise_for_status()
            sid = r.json()["id"]
            per_turn = []
            for i, message in enumerate(conversation(args.turns)):
                rec = chat_turn(client, sid, message, {**body, "seed": args.seed + i})
                per_turn.append({"turn": i + 1, **rec})
                print(
                    f"turn {i + 1}/{args.turns}: ttft {rec['ttft_s']:.3f} s, "
                    f"turn {rec['turn_s']:.3f} s, {rec['tokens']} tokens, "
                    f"memory {rec['memory_tokens']} tokens",
                    file=sys.stderr,
                )
            session = client.get(f"/v1/sessions/{sid}").json()

    result: dict[str, Any] = {
        "turns": args.turns,
        "window": args.window,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "database": url.split(":", 1)[0].split("+", 1)[0],
        "model": model,
        "ready_wait_s": round(load_s, 2),  # server listening -> /readyz 200 (model load)
        "warmup_turns": args.warmup,
        "ttft_s": summary([t["ttft_s"] for t in per_turn]),
        "turn_s": summary([t["turn_s"] for t in per_turn]),
        "tokens_per_s": summary([t["tokens_per_s"] for t in per_turn]),
        "decode_tokens_per_s": summary(
            [t["decode_tokens_per_s"] for t in per_turn if t["decode_tokens_per_s"] is not None]
        ),
        "server_memory_read_s": summary([t["server_memory_read_s"] for t in per_turn]),
        "server_memory_write_s": summary([t["server_memory_write_s"] for t in per_turn]),
        "tokens_total": sum(t["tokens"] for t in per_turn),
        "memory_tokens_final": per_turn[-1]["memory_tokens"],
        "session_messages_final": session["messages"],
        "per_turn": per_turn,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
