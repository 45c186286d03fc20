"""Replicas benchmark: several server processes over one PostgreSQL database, one conversation.

Starts N server processes the way the container starts one: ``sh docker/entrypoint.sh`` (wait for
the database, migrate, exec the server) with the app container's environment from
docker-compose.yml and .env.example, overriding only what cannot hold outside a container: the
database URL (one fresh PostgreSQL database), the address and port (127.0.0.1, a free port each),
the model cache (the image's path does not exist here), and the lock wait (short, so that
concurrent turns meet 409s). Then, on one session:

1. ``--turns`` turns sent one after another, alternating between the replicas;
2. ``--concurrent`` turns sent all at once, spread over the replicas; a turn answered 409 (the
   session is busy with another turn) is *rejected*, not lost: it is sent again (same replica)
   until accepted;
3. the transcript is checked: every accepted turn stored exactly once, at the ids the server
   answered, with the reply the client got; ids strictly increasing; user/assistant alternating;
   the sequential turns in the order they were sent. Each replica's view of the session and its
   memory must be the same (a replica whose cached copy is older than the database reloads it).

With ``--sessions K``, then K more sessions on replica 0 (each a history import of
``--session-history`` exchanges and one turn), and the replica's resident memory before and after
them: RAM per active session.

    python bench/replicas.py [--replicas 2] [--turns 12] [--concurrent 6] [--max-tokens 8]
        [--window 96] [--history 3] [--lock-timeout 0.5] [--threads N]
        [--sessions 0] [--session-window 1024] [--session-history 40]
        [--database-url URL | --pg-admin URL] [--log-dir DIR]

Database: a fresh one created through ``--pg-admin`` (default: postgres@127.0.0.1:5432, or
MEMCHAT_TEST_PG_HOST/PORT) and dropped at the end, unless ``--database-url`` names one. Prints one
JSON object on stdout (progress on stderr); exit status 1 when a turn was lost or out of order.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"


def log(msg: str) -> None:
    print(f"[replicas] {msg}", file=sys.stderr, flush=True)


# --- the compose file's environment --------------------------------------------------------------

_VAR = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}|"
    r"(?P<plain>[A-Za-z_][A-Za-z0-9_]*)|(?P<dollar>\$))"
)


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Compose's variable interpolation: ``${VAR}``, ``$VAR``, ``${VAR:-default}``,
    ``${VAR-default}``, ``${VAR:?err}``, and ``$$`` for a literal dollar."""

    def sub(m: re.Match[str]) -> str:
        if m.group("dollar"):
            return "$"
        name = m.group("braced") or m.group("plain")
        op, arg = m.group("op"), m.group("arg") or ""
        val = variables.get(name)
        if op in (":-", ":?") and not val or op in ("-", "?") and val is None:
            if op.endswith("?"):
                raise ValueError(f"required variable {name} is unset: {arg}")
            return interpolate(arg, variables)
        return val or ""

    return _VAR.sub(sub, value)


def parse_env_file(path: Path, variables: Mapping[str, str] | None = None) -> dict[str, str]:
    """A compose env file: ``KEY=value`` lines; blank lines and ``#`` lines skipped; a value in
    matching quotes loses them; values interpolated."""
    out: dict[str, str] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", key):
            raise ValueError(f"{path}:{n}: not a KEY=value line: {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key] = interpolate(value, variables or {})
    return out


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def compose_environment(
    service: str = "app",
    compose_file: Path = COMPOSE_FILE,
    variables: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment docker compose gives ``service``'s container: its ``env_file`` files in
    order, then its ``environment`` (which wins), interpolated with ``variables`` (default: none
    set, so every ``${VAR:-default}`` takes its default)."""
    variables = variables or {}
    doc = yaml.safe_load(compose_file.read_text())
    svc = doc["services"][service]
    env: dict[str, str] = {}
    files = svc.get("env_file") or []
    for item in [files] if isinstance(files, str | dict) else files:
        spec = {"path": item} if isinstance(item, str) else item
        path = compose_file.parent / spec["path"]
        if not path.is_file() and spec.get("required", True) in (False, "false"):
            continue
        env.update(parse_env_file(path, variables))
    environment = svc.get("environment") or {}
    if isinstance(environment, list):
        pairs = [e.partition("=") for e in environment]
        environment = {k: (v if sep else variables.get(k)) for k, sep, v in pairs}
    for key, value in environment.items():
        if value is not None:
            env[key] = interpolate(_scalar(value), variables)
    return env


def local_cache_dir() -> Path:
    """This machine's model cache: what ``Settings()`` takes here (MEMCHAT_CACHE_DIR or the
    default), prepared by ``make model``."""
    sys.path.insert(0, str(ROOT))
    from app.config import Settings

    return Settings(_env_file=None).cache_dir


def process_environment(container_env: Mapping[str, str], **overrides: str) -> dict[str, str]:
    """The environment of an entrypoint run on this machine: this process's environment without
    any MEMCHAT_* variable, the container's on top, then ``overrides``; this interpreter's
    directory first on PATH (the entrypoint runs ``python``), the repository on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMCHAT_")}
    env.update(container_env)
    env.update(overrides)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- a server process ----------------------------------------------------------------------------


class Server:
    """``sh docker/entrypoint.sh`` in a subprocess (its output to ``log_path``); after the exec,
    the process is the server itself."""

    def __init__(self, env: Mapping[str, str], log_path: Path, cwd: Path) -> None:
        self.env = dict(env)
        self.port = int(self.env["MEMCHAT_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                ["sh", str(ENTRYPOINT)],
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Poll /readyz until 200; returns the seconds it took. Raises with the log's tail when
        the process exits or the time runs out."""
        assert self.proc is not None
        t0 = time.monotonic()
        last = "no answer"
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"server on port {self.port} exited with {self.proc.returncode}:\n"
                        f"{self.log_text()[-4000:]}"
                    )
                try:
                    r = client.get("/readyz")
                    if r.status_code == 200:
                        return time.monotonic() - t0
                    last = r.text
                    if '"failed' in r.text:
                        raise RuntimeError(f"the model failed to load: {r.text}")
                except httpx.TransportError as exc:
                    last = f"{type(exc).__name__}"
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(
                        f"server on port {self.port} not ready after {timeout:.0f} s ({last}):\n"
                        f"{self.log_text()[-4000:]}"
                    )
                time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Send ``sig`` and wait for the exit; SIGKILL after ``timeout``. Returns the exit code
        (uvicorn re-raises SIGTERM after its graceful shutdown: -15), None when it had to be
        killed."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None

    def rss_bytes(self) -> int | None:
        """Resident memory of the server process (Linux /proc), None when unknown."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        m = re.search(r"^VmRSS:\s+(\d+)\s+kB", status, re.M)
        return int(m.group(1)) * 1024 if m else None


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new, uniquely named PostgreSQL database (SQLAlchemy URL), dropped on exit."""
    import psycopg
    from psycopg.conninfo import make_conninfo
    from sqlalchemy.engine import make_url

    admin = make_url(admin_url)
    name = f"memchat_replicas_{uuid.uuid4().hex[:12]}"
    conninfo = make_conninfo(
        host=admin.host or "127.0.0.1",
        port=admin.port or 5432,
        user=admin.username or "postgres",
        password=admin.password,
        dbname=admin.database or "postgres",
        connect_timeout=5,
    )
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = admin.set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def replicas(
    n: int,
    database_url: str,
    log_dir: Path,
    extra: Mapping[str, str] | None = None,
    ready_timeout: float = 300.0,
) -> Iterator[list[Server]]:
    """``n`` entrypoint processes over ``database_url``, all started at once (so they migrate
    at once: the migration lock serializes them), each ready on its own port; stopped on exit."""
    container = compose_environment()
    servers = []
    for i in range(n):
        env = process_environment(
            container,
            MEMCHAT_DATABASE_URL=database_url,
            MEMCHAT_HOST="127.0.0.1",
            MEMCHAT_PORT=str(free_port()),
            MEMCHAT_CACHE_DIR=str(local_cache_dir()),
            # loopback only, so auth may be off: this measures sessions shared by processes
            # (tests/deploy/test_deploy_entrypoint.py runs the stack's auth)
            MEMCHAT_AUTH_ENABLED="false",
            **(extra or {}),
        )
        workdir = log_dir / f"replica{i}"
        workdir.mkdir(parents=True, exist_ok=True)
        servers.append(Server(env, log_dir / f"replica{i}.log", workdir))
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready(ready_timeout)
        yield servers
    finally:
        for s in servers:
            s.stop()


# --- the conversation ----------------------------------------------------------------------------


def filler(n: int) -> list[dict[str, str]]:
    """n user/assistant exchanges, to push earlier messages out of the window into memory."""
    out = []
    for i in range(n):
        out.append({"role": "user", "content": f"Tell me fact number {i} about the ocean."})
        out.append({"role": "assistant", "content": "The ocean covers most of the planet."})
    return out


def send_turn(
    base_url: str,
    replica: int,
    sid: str,
    text: str,
    phase: str,
    index: int,
    body: Mapping[str, Any],
    deadline: float,
    start: threading.Barrier | None = None,
) -> dict[str, Any]:
    """One turn, sent again after each 409 (the session was busy) until accepted or
    ``deadline``; any other answer ends it."""
    rec: dict[str, Any] = {
        "phase": phase,
        "index": index,
        "replica": replica,
        "text": text,
        "status": None,
        "attempts": 0,
        "rejected_409": 0,
    }
    rng = random.Random(f"{phase}-{index}")
    with httpx.Client(base_url=base_url, timeout=300) as client:
        if start is not None:
            start.wait(60)
        while True:
            rec["attempts"] += 1
            t0 = time.monotonic()
            try:
                r = client.post(f"/v1/sessions/{sid}/chat", json={"message": text, **body})
            except httpx.TransportError as exc:
                rec.update(status=f"transport error: {type(exc).__name__}")
                return rec
            rec["status"] = r.status_code
            if r.status_code == 200:
                out = r.json()
                rec.update(
                    turn_s=round(time.monotonic() - t0, 4),
                    user_message_id=out["user_message_id"],
                    message_id=out["message_id"],
                    reply=out["reply"],
                )
                return rec
            if r.status_code != 409 or time.monotonic() > deadline:
                rec["error"] = r.text[:500]
                return rec
            rec["rejected_409"] += 1
            time.sleep(rng.uniform(0.05, 0.25))


def transcript(client: httpx.Client, sid: str) -> list[dict[str, Any]]:
    """Every message of the session, oldest first (all pages)."""
    out: list[dict[str, Any]] = []
    while True:
        r = client.get(f"/v1/sessions/{sid}/messages", params={"limit": 1000, "offset": len(out)})
        r.raise_for_status()
        page = r.json()
        out.extend(page["data"])
        if not page["data"] or len(out) >= page["total"]:
            return out


def memory_view(client: httpx.Client, sid: str) -> dict[str, Any]:
    """What a replica holds of the session's memory (comparable across replicas)."""
    r = client.get(f"/v1/sessions/{sid}/memory", params={"limit": 1000})
    r.raise_for_status()
    m = r.json()
    # not ``bytes``: the RAM a replica's copy takes depends on how it grew (appended turn by turn,
    # or loaded whole), not on what it holds
    return {
        "turn": m["turn"],
        "entries": m["entries"],
        "tokens": m["tokens"],
        "messages": [
            (
                x["message_id"],
                x["tokens"],
                x["entries"],
                round(x["mean_strength"], 6),
                round(x["min_strength"], 6),
                round(x["attention"], 4),
                x["age_turns"],
            )
            for x in m["messages"]
        ],
    }


def check_transcript(
    msgs: list[dict[str, Any]], records: list[dict[str, Any]], history_messages: int
) -> dict[str, Any]:
    """Stored exactly once, in order, as answered: the figures of the transcript check."""
    ids = [m["id"] for m in msgs]
    id_violations = sum(1 for a, b in zip(ids, ids[1:], strict=False) if b <= a)
    # after the system block and the imported history, the live turns: user, assistant, ...
    live = msgs[1 + history_messages :]
    role_violations = sum(
        1 for i, m in enumerate(live) if m["role"] != ("user" if i % 2 == 0 else "assistant")
    )
    by_id = {m["id"]: m for m in msgs}
    accepted = [r for r in records if r["status"] == 200]
    mismatched = 0
    for r in accepted:
        user, reply = by_id.get(r["user_message_id"]), by_id.get(r["message_id"])
        ok = (
            user is not None
            and reply is not None
            and user["role"] == "user"
            and user["content"] == r["text"]
            and reply["role"] == "assistant"
            and reply["content"] == r["reply"]
            and ids.index(r["message_id"]) == ids.index(r["user_message_id"]) + 1
        )
        mismatched += not ok
    sequential = [r for r in accepted if r["phase"] == "sequential"]
    seq_ids = [r["user_message_id"] for r in sequential]
    sequence_violations = sum(1 for a, b in zip(seq_ids, seq_ids[1:], strict=False) if b <= a)
    stored = Counter(m["content"] for m in live if m["role"] == "user")
    sent_texts = [r["text"] for r in records]
    accepted_texts = {r["text"] for r in accepted}
    return {
        "turns_stored": sum(1 for t in sent_texts if stored[t] >= 1),
        "turns_lost": sum(1 for t in accepted_texts if stored[t] == 0),
        "duplicates": sum(stored[t] - 1 for t in sent_texts if stored[t] > 1),
        "unexpected_messages": sum(c for t, c in stored.items() if t not in set(sent_texts)),
        "stored_but_not_accepted": sum(
            1 for t in sent_texts if stored[t] and t not in accepted_texts
        ),
        "order_violations": id_violations + role_violations + sequence_violations + mismatched,
        "order_checks": {
            "ids_not_increasing": id_violations,
            "roles_not_alternating": role_violations,
            "sequential_out_of_order": sequence_violations,
            "turns_not_as_answered": mismatched,
        },
    }


def _dist(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "mean": None}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "p50": round(statistics.median(ordered), 4),
        "p95": round(p95, 4),
        "mean": round(statistics.fmean(ordered), 4),
    }


def _mb(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def run_scenario(
    servers: list[Server],
    turns: int,
    concurrent: int,
    max_tokens: int,
    window: int,
    history: int,
    turn_deadline_s: float = 300.0,
) -> dict[str, Any]:
    """The alternating and concurrent turns on one session, and the checks; returns figures."""
    n = len(servers)
    body = {"max_tokens": max_tokens, "temperature": 0}
    clients = [httpx.Client(base_url=s.url, timeout=300) for s in servers]
    with ExitStack() as stack:
        for c in clients:
            stack.enter_context(c)
        r = clients[0].post("/v1/sessions", json={"title": "replicas", "window": window})
        r.raise_for_status()
        sid = r.json()["id"]
        if history:  # through another replica; what overflows the window goes to memory
            r = clients[1 % n].post(
                f"/v1/sessions/{sid}/messages", json={"messages": filler(history)}
            )
            r.raise_for_status()
        t0 = time.monotonic()
        records: list[dict[str, Any]] = []
        for i in range(turns):
            text = f"Turn {i} of the alternating run: name one animal of the sea."
            rec = send_turn(
                servers[i % n].url,
                i % n,
                sid,
                text,
                "sequential",
                i,
                body,
                time.monotonic() + turn_deadline_s,
            )
            records.append(rec)
            log(f"sequential {i + 1}/{turns} on replica {i % n}: {rec['status']}")
        if concurrent:
            barrier = threading.Barrier(concurrent)
            deadline = time.monotonic() + turn_deadline_s
            with ThreadPoolExecutor(concurrent) as pool:
                futures = [
                    pool.submit(
                        send_turn,
                        servers[j % n].url,
                        j % n,
                        sid,
                        f"Concurrent turn {j}: name one bird of the coast.",
                        "concurrent",
                        j,
                        body,
                        deadline,
                        barrier,
                    )
                    for j in range(concurrent)
                ]
                for f in futures:
                    rec = f.result()
                    records.append(rec)
                    log(
                        f"concurrent {rec['index']} on replica {rec['replica']}: {rec['status']} "
                        f"after {rec['rejected_409']} x 409"
                    )
        run_s = time.monotonic() - t0

        msgs = transcript(clients[0], sid)
        transcripts_equal = all(transcript(c, sid) == msgs for c in clients[1:])
        views = [memory_view(c, sid) for c in clients]
        turns_seen = [c.get(f"/v1/sessions/{sid}").json()["turn"] for c in clients]
    figures = check_transcript(msgs, records, 2 * history)
    accepted = [r for r in records if r["status"] == 200]
    return {
        "session_id": sid,
        "turns_sent": len(records),
        "sequential_turns": turns,
        "concurrent_turns": concurrent,
        "requests_sent": sum(r["attempts"] for r in records),
        "turns_accepted": len(accepted),
        "rejected_409": sum(r["rejected_409"] for r in records),
        "turns_failed": len(records) - len(accepted),
        **figures,
        "accepted_per_replica": [sum(1 for r in accepted if r["replica"] == i) for i in range(n)],
        "transcript_messages": len(msgs),
        "transcripts_equal": transcripts_equal,
        "memory_consistent": all(v == views[0] for v in views[1:]),
        "session_turn_per_replica": turns_seen,
        "memory_tokens": views[0]["tokens"],
        "memory_entries": views[0]["entries"],
        "turn_s": _dist([r["turn_s"] for r in accepted]),
        "run_s": round(run_s, 2),
        "failures": [
            {k: r.get(k) for k in ("phase", "index", "replica", "status", "error")}
            for r in records
            if r["status"] != 200
        ],
    }


def size_sessions(
    server: Server, sessions: int, window: int, history: int, max_tokens: int
) -> dict[str, Any]:
    """RAM per active session: ``sessions`` sessions on one replica, each a history import and
    one turn (so its window and memory are in RAM), the process's RSS after each. The figure is
    the slope of RSS over sessions (least squares) from the first sizing session on: the first
    long prompt a process sees grows it once (allocator arenas, attention buffers), reported
    apart as ``rss_first_session_mb``."""
    with httpx.Client(base_url=server.url, timeout=300) as client:
        rss = [server.rss_bytes()]
        mem_bytes, mem_tokens, window_tokens = [], [], []
        for i in range(sessions):
            r = client.post("/v1/sessions", json={"title": f"sizing {i}", "window": window})
            r.raise_for_status()
            sid = r.json()["id"]
            msgs = filler(history)
            for m in msgs[::2]:
                m["content"] += f" (session {i})"
            client.post(f"/v1/sessions/{sid}/messages", json={"messages": msgs}).raise_for_status()
            r = client.post(
                f"/v1/sessions/{sid}/chat",
                json={"message": "Which fact did I ask for first?", "max_tokens": max_tokens},
            )
            r.raise_for_status()
            view = client.get(f"/v1/sessions/{sid}/memory", params={"limit": 1}).json()
            mem_bytes.append(view["bytes"])
            mem_tokens.append(view["tokens"])
            window_tokens.append(view["window"]["tokens"])
            rss.append(server.rss_bytes())
            log(f"sizing session {i + 1}/{sessions}: {view['tokens']} memory tokens")
    known = [(i, b) for i, b in enumerate(rss) if b is not None]
    first = known[1][1] - known[0][1] if len(known) >= 2 and known[1][0] == 1 else None
    if len(known) >= 4:
        known = known[1:]  # without the one-off growth of the first session
    slope = None
    if len(known) >= 2:
        xs, ys = [float(i) for i, _ in known], [float(b) for _, b in known]
        slope = statistics.linear_regression(xs, ys).slope
    return {
        "sessions": sessions,
        "session_window": window,
        "session_history_messages": 2 * history,
        "window_tokens_per_session": round(statistics.fmean(window_tokens)),
        "memory_tokens_per_session": round(statistics.fmean(mem_tokens)),
        "memory_bytes_per_session_mb": _mb(round(statistics.fmean(mem_bytes))),
        "rss_mb": [_mb(b) for b in rss],
        "rss_first_session_mb": _mb(first),
        "rss_per_session_mb": _mb(round(slope)) if slope is not None else None,
    }


def default_admin_url() -> str:
    host = os.environ.get("MEMCHAT_TEST_PG_HOST", "127.0.0.1")
    port = os.environ.get("MEMCHAT_TEST_PG_PORT", "5432")
    return f"postgresql://postgres@{host}:{port}/postgres"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--turns", type=int, default=12, help="alternating turns, one at a time")
    p.add_argument("--concurrent", type=int, default=6, help="turns sent at once")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--window", type=int, default=96, help="the session's window (small: memory)")
    p.add_argument("--history", type=int, default=3, help="exchanges imported first")
    p.add_argument("--lock-timeout", type=float, default=0.5, help="MEMCHAT_LOCK_TIMEOUT")
    p.add_argument("--threads", type=int, default=None, help="MEMCHAT_THREADS per replica")
    p.add_argument("--sessions", type=int, default=0, help="sessions for the RAM sizing")
    p.add_argument("--session-window", type=int, default=1024)
    p.add_argument("--session-history", type=int, default=40, help="exchanges per session")
    p.add_argument("--database-url", default=None, help="an existing (empty) database")
    p.add_argument("--pg-admin", default=default_admin_url(), help="to create a fresh database")
    p.add_argument("--log-dir", type=Path, default=None, help="server logs (default: temporary)")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    if args.replicas < 1:
        p.error("--replicas must be at least 1")

    extra = {"MEMCHAT_LOCK_TIMEOUT": str(args.lock_timeout), "MEMCHAT_LOG_LEVEL": "WARNING"}
    if args.threads:
        extra["MEMCHAT_THREADS"] = str(args.threads)
    with ExitStack() as stack:
        log_dir = args.log_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        log_dir.mkdir(parents=True, exist_ok=True)
        url = args.database_url or stack.enter_context(fresh_database(args.pg_admin))
        log(f"starting {args.replicas} replicas (logs in {log_dir})")
        t0 = time.monotonic()
        servers = stack.enter_context(
            replicas(args.replicas, url, log_dir, extra, ready_timeout=args.ready_timeout)
        )
        start_s = time.monotonic() - t0
        rss_ready = [s.rss_bytes() for s in servers]
        out: dict[str, Any] = {"replicas": args.replicas}
        out.update(
            run_scenario(
                servers, args.turns, args.concurrent, args.max_tokens, args.window, args.history
            )
        )
        out.update(
            {
                "start_s": round(start_s, 2),
                "lock_timeout_s": args.lock_timeout,
                "max_tokens": args.max_tokens,
                "window": args.window,
                "rss_ready_mb": [_mb(b) for b in rss_ready],
                "rss_end_mb": [_mb(s.rss_bytes()) for s in servers],
            }
        )
        if args.sessions:
            out["sizing"] = size_sessions(
                servers[0],
                args.sessions,
                args.session_window,
                args.session_history,
                args.max_tokens,
            )
        out["cpus"] = os.cpu_count()
        out["python"] = platform.python_version()
    print(json.dumps(out, indent=2))
    ok = (
        out["turns_lost"] == 0
        and out["duplicates"] == 0
        and out["order_violations"] == 0
        and out["turns_failed"] == 0
        and out["transcripts_equal"]
        and out["memory_consistent"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
