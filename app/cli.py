"""Command line: ``serve`` (the HTTP server), ``db`` (schema migrations), ``keys`` (API keys of
tenants), ``chat`` (terminal chat, persistent memory), ``prepare-model`` and ``bench``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config import Settings

if TYPE_CHECKING:  # torch and transformers load only when a command needs them
    from app.engine import Engine


def _engine(settings: Settings, window: int | None = None) -> Engine:
    import torch

    from app.db import make_sessionmaker
    from app.engine import Engine
    from app.model import load_model

    if settings.threads:
        torch.set_num_threads(settings.threads)
    lm = load_model(settings.model_path, settings.cache_dir, weights=settings.weights)
    return Engine(
        lm,
        make_sessionmaker(settings.database_url),
        window=window or settings.window,
        max_new_tokens=settings.max_new_tokens,
        decode_batch=settings.decode_batch,
    )


def cmd_prepare_model(settings: Settings, _args: argparse.Namespace) -> int:
    """Dequantize the bundled model into the cache (or check a given model directory)."""
    from app.model import resolve_model_dir

    print(resolve_model_dir(settings.model_path, settings.cache_dir))
    return 0


def cmd_chat(settings: Settings, args: argparse.Namespace) -> int:
    """Terminal chat; the session (by name) and its memory persist in the database."""
    from app.engine import SessionOptions

    engine = _engine(settings, args.window)
    sid = engine.find_session(args.session)
    if sid is None:
        sid = engine.create_session(
            name=args.session, options=SessionOptions(system_prompt=args.system)
        )
        print(f"new session {args.session!r} ({settings.database_url})", file=sys.stderr)
    else:
        st = engine.state(sid)
        print(
            f"session {args.session!r}: turn {st.turn}, {st.memory.token_count()} tokens in memory",
            file=sys.stderr,
        )
    print("Type a message; Ctrl-D or /quit to leave.", file=sys.stderr)
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        print("bot> ", end="", flush=True)
        for piece in engine.chat(sid, text):
            print(piece, end="", flush=True)
        print()


def cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    """Run a benchmark script from ``bench/`` with the remaining arguments."""
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    import importlib

    bench: Any = importlib.import_module(f"bench.{args.name}")
    return int(bench.main(args.rest))


def cmd_db(settings: Settings, args: argparse.Namespace) -> int:
    """Schema migrations: ``upgrade`` (default: to the newest), ``current``, ``downgrade REV``."""
    from alembic.util import CommandError
    from sqlalchemy.engine import make_url

    from app.db import (
        SchemaError,
        current_revision,
        downgrade_database,
        head_revision,
        upgrade_database,
    )

    url = args.url or settings.database_url
    shown = make_url(url).render_as_string(hide_password=True)
    head = head_revision()

    def label(rev: str | None) -> str:
        if rev is None:
            return "none"
        return f"{rev} (head)" if rev == head else rev

    try:
        before = current_revision(url)
        if args.db_command == "current":
            print(label(before))
            return 0
        if args.db_command == "upgrade":
            upgrade_database(url, args.revision)
        else:
            downgrade_database(url, args.revision)
        after = current_revision(url)
    except (SchemaError, CommandError) as exc:  # CommandError: e.g. an unknown revision
        print(f"error: {shown}: {exc}", file=sys.stderr)
        return 2
    print(f"{shown}: {label(before)} -> {label(after)}")
    return 0


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    """API keys: ``create --tenant NAME`` (prints the key, once), ``list``, ``revoke``."""
    from app.auth import KeyNotFound, create_key, list_keys, revoke_key
    from app.db import SchemaError, make_sessionmaker

    try:
        db = make_sessionmaker(args.url or settings.database_url)
    except SchemaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.keys_command == "create":
            key, info = create_key(db, args.tenant, args.name)
            print(key)
            print(
                f"created key {info.prefix}... ({info.id}) for tenant {info.tenant!r}; it is shown "
                "only now: store it (send it as `Authorization: Bearer <key>`)",
                file=sys.stderr,
            )
        elif args.keys_command == "list":
            rows = [("PREFIX", "TENANT", "NAME", "CREATED", "LAST USED", "REVOKED", "ID")]
            for k in list_keys(db, args.tenant):
                rows.append(
                    (k.prefix, k.tenant, k.name or "-", _when(k.created_at),
                     _when(k.last_used_at), _when(k.revoked_at), k.id)
                )  # fmt: skip
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for r in rows:
                print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
        else:
            info = revoke_key(db, args.key)
            print(f"revoked {info.prefix}... ({info.id}) of tenant {info.tenant!r}")
    except KeyNotFound as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    finally:
        db.kw["bind"].dispose()
    return 0


def _when(t: Any) -> str:
    return "-" if t is None else t.strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    """The HTTP server (uvicorn). Flags override the settings; workers build their app from the
    environment, so the flags are handed over through it. Refuses to listen beyond loopback
    with auth off (`app.config.check_exposure`)."""
    import os

    import uvicorn

    from app.config import InsecureConfig, check_exposure

    host = args.host or settings.host
    port = args.port or settings.port
    workers = args.workers or settings.workers
    try:
        check_exposure(settings, host)
    except InsecureConfig as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ.update(
        {"MEMCHAT_HOST": host, "MEMCHAT_PORT": str(port), "MEMCHAT_WORKERS": str(workers)}
    )
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,  # app.observability configures logging (JSON lines)
        timeout_graceful_shutdown=30,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m app`` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", default=None, help="bind address (default: MEMCHAT_HOST)")
    serve.add_argument("--port", type=int, default=None, help="port (default: MEMCHAT_PORT)")
    serve.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: MEMCHAT_WORKERS)"
    )
    sub.add_parser("prepare-model", help="prepare the model cache and print its directory")
    chat = sub.add_parser("chat", help="chat in the terminal")
    chat.add_argument("--session", default="default", help="session name (created if new)")
    chat.add_argument(
        "--window", type=int, default=None, help="working window in tokens (new sessions)"
    )
    chat.add_argument("--system", default=None, help="system prompt (new sessions)")
    bench = sub.add_parser("bench", help="run a benchmark (recall, perf, service, replicas, load)")
    bench.add_argument("name", choices=["recall", "perf", "service", "replicas", "load"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    db = sub.add_parser("db", help="database schema migrations (upgrade, current, downgrade)")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_upgrade = db_sub.add_parser("upgrade", help="upgrade the schema (default: to the newest)")
    db_upgrade.add_argument("--revision", default="head", help="target revision (default: head)")
    db_sub.add_parser("current", help="print the schema revision of the database")
    db_downgrade = db_sub.add_parser("downgrade", help="downgrade the schema to REV")
    db_downgrade.add_argument("revision", metavar="REV", help="target revision (base: no tables)")
    for p in db_sub.choices.values():
        p.add_argument("--url", default=None, help="database URL (default: the settings')")
    keys = sub.add_parser("keys", help="API keys of tenants (create, list, revoke)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    keys_create = keys_sub.add_parser(
        "create", help="create a key (and its tenant, if new); prints the key, shown only once"
    )
    keys_create.add_argument("--tenant", required=True, help="tenant name")
    keys_create.add_argument("--name", default="", help="a label for the key")
    keys_list = keys_sub.add_parser("list", help="list keys (never the keys themselves)")
    keys_list.add_argument("--tenant", default=None, help="only this tenant's keys")
    keys_revoke = keys_sub.add_parser("revoke", help="revoke a key (by prefix, id or the key)")
    keys_revoke.add_argument("key", metavar="PREFIX_OR_ID", help="the key's prefix or id")
    for p in keys_sub.choices.values():
        p.add_argument("--url", default=None, help="database URL (default: the settings')")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m app``."""
    args = build_parser().parse_args(argv)
    settings = Settings()
    if args.command == "db":  # no model needed: skip importing torch
        return cmd_db(settings, args)
    if args.command == "keys":
        return cmd_keys(settings, args)
    from app.model import ModelNotFound

    handlers = {
        "serve": cmd_serve,
        "prepare-model": cmd_prepare_model,
        "chat": cmd_chat,
        "bench": cmd_bench,
    }
    try:
        return handlers[args.command](settings, args)
    except ModelNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
