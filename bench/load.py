"""Load test: many sessions talking at once to a real server process on loopback.

Starts ``python -m app serve`` (a child process, so that its RAM is its own) on a free port of
127.0.0.1 with a temporary SQLite file (or ``--database-url``), creates ``--sessions`` sessions and
runs ``--turns`` chat turns in each, ``--concurrency`` sessions at a time (a session's turns run in
order; the load ends when every session has had its turns). Every request is accounted for: it
answered 2xx, answered an error, or was lost (no answer: a transport error or a timeout); after the
run each session's transcript must hold exactly its accepted turns. Prints one JSON object: error
rate, p50/p95 turn latency, throughput, the server's peak RSS, requests lost (must be 0).

    python -m app bench load [--sessions 32] [--turns 20] [--concurrency 4] [--max-tokens 8]
        [--window 256] [--database-url URL] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Hi! My name is Sam and I keep bees.",
    "What should I plant for my bees this spring?",
    "Give me one tip for a rainy day.",
    "What is my name, and what do I keep?",
    "Tell me a short fact about honey.",
]


def _rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (Linux ``/proc``), 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler(threading.Thread):
    """Samples a process's RSS every ``interval`` seconds; ``peak`` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, _rss_kib(self.pid))
            self._done.wait(self.interval)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def start_server(
    url: str, threads: int | None, max_tokens: int
) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m app serve`` on a free loopback port; returns (process, base URL) once ready."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMCHAT_")}
    env |= {
        "MEMCHAT_DATABASE_URL": url,
        "MEMCHAT_MAX_NEW_TOKENS": str(max_tokens),
        "MEMCHAT_LOG_LEVEL": "WARNING",
        "MEMCHAT_RATE_LIMIT_PER_MINUTE": "0",
        "MEMCHAT_LOCK_TIMEOUT": "600",
    }
    if threads:
        env["MEMCHAT_THREADS"] = str(threads)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("the server did not get ready")


def run_session(base: str, sid: str, turns: int, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The session's turns in order; one record per request: status (None: lost), seconds."""
    out = []
    with httpx.Client(base_url=base, timeout=600) as http:
        for i in range(turns):
            message = f"{PROMPTS[i % len(PROMPTS)]} (turn {i + 1})"
            t0 = time.monotonic()
            try:
                r = http.post(f"/v1/sessions/{sid}/chat", json={"message": message, **body})
                status: int | None = r.status_code
                ok = r.status_code == 200 and "reply" in r.json()
            except (httpx.TransportError, json.JSONDecodeError):
                status, ok = None, False
            out.append(
                {"session": sid, "turn": i, "status": status, "ok": ok, "s": time.monotonic() - t0}
            )
    return out


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints the JSON result."""
    ap = argparse.ArgumentParser(prog="bench load", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=32, help="sessions, each with its own turns")
    ap.add_argument("--turns", type=int, default=20, help="chat turns per session")
    ap.add_argument("--concurrency", type=int, default=4, help="sessions talking at once")
    ap.add_argument("--max-tokens", type=int, default=8, help="reply length cap per turn")
    ap.add_argument("--window", type=int, default=256, help="each session's window in tokens")
    ap.add_argument("--database-url", default=None, help="SQLAlchemy URL (default: temp SQLite)")
    ap.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    args = ap.parse_args(argv)
    if min(args.sessions, args.turns, args.concurrency, args.max_tokens) < 1:
        ap.error("--sessions, --turns, --concurrency and --max-tokens must be at least 1")

    with tempfile.TemporaryDirectory(prefix="memchat-load-") as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'memchat.db'}"
        t_start = time.monotonic()
        proc, base = start_server(url, args.threads, args.max_tokens)
        ready_s = time.monotonic() - t_start
        sampler = RssSampler(proc.pid)
        sampler.start()
        try:
            with httpx.Client(base_url=base, timeout=120) as http:
                sids = []
                for i in range(args.sessions):
                    body = {"title": f"load {i}", "window": args.window}
                    r = http.post("/v1/sessions", json=body)
                    r.raise_for_status()
                    sids.append(r.json()["id"])
            print(f"{args.sessions} sessions on {base}; running", file=sys.stderr)
            body = {"max_tokens": args.max_tokens, "temperature": 0}
            t0 = time.monotonic()
            with ThreadPoolExecutor(args.concurrency) as pool:
                per = list(pool.map(lambda s: run_session(base, s, args.turns, body), sids))
            wall = time.monotonic() - t0
            records = [r for rs in per for r in rs]
            # every accepted turn is stored: user message and reply, nothing else
            stored_ok = True
            with httpx.Client(base_url=base, timeout=120) as http:
                for sid, rs in zip(sids, per, strict=True):
                    got = http.get(f"/v1/sessions/{sid}").json()["messages"]
                    stored_ok &= got == 1 + 2 * sum(r["ok"] for r in rs)
            peak_kib = sampler.stop()
        finally:
            proc.terminate()  # first: the server must not outlive a failed run
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            if sampler.is_alive():
                sampler.stop()

    latencies = [r["s"] for r in records if r["ok"]]
    sent = len(records)
    errors = sum(1 for r in records if not r["ok"] and r["status"] is not None)
    lost = sum(1 for r in records if r["status"] is None)
    result: dict[str, Any] = {
        "sessions": args.sessions,
        "turns_per_session": args.turns,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "window": args.window,
        "database": url.split(":", 1)[0].split("+", 1)[0],
        "requests": sent,
        "ok": len(latencies),
        "errors": errors,
        "lost": lost,
        "error_rate": round((errors + lost) / sent, 6) if sent else 0.0,
        "statuses": {
            str(k): sum(1 for r in records if r["status"] == k)
            for k in sorted({r["status"] for r in records}, key=str)
        },
        "turn_latency_s": {
            "p50": _pct(latencies, 50),
            "p95": _pct(latencies, 95),
            "max": round(max(latencies), 4) if latencies else None,
        },
        "throughput_turns_per_s": round(len(latencies) / wall, 3) if wall > 0 else None,
        "wall_s": round(wall, 2),
        "server_ready_s": round(ready_s, 2),
        "server_peak_rss_mib": round(peak_kib / 1024, 1),
        "stored_turns_match": stored_ok,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0 if lost == 0 and stored_ok else 1


if __name__ == "__main__":
    sys.exit(main())
