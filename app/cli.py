"""Command line: ``prepare-model``, ``chat`` (terminal chat, persistent memory) and ``bench``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

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
    lm = load_model(settings.model_path, settings.cache_dir)
    return Engine(
        lm,
        make_sessionmaker(settings.database_url),
        window=window or settings.window,
        max_new_tokens=settings.max_new_tokens,
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
    if args.name == "recall":
        from bench.recall import main as recall_main

        return recall_main(args.rest)
    if args.name == "perf":
        from bench.perf import main as perf_main

        return perf_main(args.rest)
    print(f"unknown benchmark {args.name!r}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m app`` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare-model", help="prepare the model cache and print its directory")
    chat = sub.add_parser("chat", help="chat in the terminal")
    chat.add_argument("--session", default="default", help="session name (created if new)")
    chat.add_argument(
        "--window", type=int, default=None, help="working window in tokens (new sessions)"
    )
    chat.add_argument("--system", default=None, help="system prompt (new sessions)")
    bench = sub.add_parser("bench", help="run a benchmark (recall, perf)")
    bench.add_argument("name", choices=["recall", "perf"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m app``."""
    args = build_parser().parse_args(argv)
    settings = Settings()
    from app.model import ModelNotFound

    handlers = {"prepare-model": cmd_prepare_model, "chat": cmd_chat, "bench": cmd_bench}
    try:
        return handlers[args.command](settings, args)
    except ModelNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
