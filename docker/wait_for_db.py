"""Wait until the database of the settings answers: the entrypoint's first step.

    python docker/wait_for_db.py [--timeout 60] [--interval 1]

Builds the settings first (from the environment, as the server will), so that an invalid setting
fails here, at once, with pydantic's message. Then connects and runs ``SELECT 1`` until it works or
``--timeout`` seconds have passed. Exit status: 0 the database answers, 1 it did not in time,
2 invalid settings.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def log(msg: str) -> None:
    print(f"[entrypoint] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait at most")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between attempts")
    args = parser.parse_args(argv)

    from pydantic import ValidationError
    from sqlalchemy import create_engine, pool, text
    from sqlalchemy.engine import make_url

    from app.config import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        log(f"invalid settings: {exc}")
        return 2
    url = settings.database_url
    shown = make_url(url).render_as_string(hide_password=True)
    connect_args: dict[str, Any] = {}
    if make_url(url).get_backend_name() == "postgresql":
        connect_args["connect_timeout"] = max(1, min(10, int(args.timeout)))
    engine = create_engine(url, poolclass=pool.NullPool, connect_args=connect_args)
    deadline = time.monotonic() + args.timeout
    attempt = 0
    try:
        while True:
            attempt += 1
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
            except Exception as exc:  # any failure to connect: retry until the deadline
                reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
                if time.monotonic() + args.interval > deadline:
                    log(f"database {shown} not answering after {attempt} attempts: {reason}")
                    return 1
                if attempt == 1 or attempt % 10 == 0:
                    log(f"waiting for database {shown} ({reason})")
                time.sleep(args.interval)
                continue
            log(f"database {shown} answers")
            return 0
    finally:
        engine.dispose()


if __name__ == "__main__":
    raise SystemExit(main())
