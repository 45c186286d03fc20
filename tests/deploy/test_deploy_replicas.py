"""Several replicas, one database, for real: two server processes (each started by
docker/entrypoint.sh, each loading the model) on two ports over one fresh PostgreSQL database.
The turns of one session alternate between them, then some are sent to both at once (a 409 is
a rejection, sent again, never a loss): every accepted turn is stored exactly once, in order, as
the server answered it, and both processes see the same session and memory afterwards (each
reloads its cached copy when the other wrote). The figures are bench/replicas.py's, small."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


@pytest.mark.slow  # two server processes with the real model
def test_two_replicas_one_session(
    bench: ModuleType,
    pg_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    report: Any,
) -> None:
    argv = [
        "--replicas", "2", "--turns", "6", "--concurrent", "4", "--max-tokens", "6",
        "--window", "96", "--history", "3", "--lock-timeout", "0.3",
        "--sessions", "1", "--session-window", "128", "--session-history", "6",
        "--database-url", pg_url, "--log-dir", str(tmp_path),
    ]  # fmt: skip
    rc = bench.main(argv)
    out = json.loads(capsys.readouterr().out)
    report("replicas: two server processes, one PostgreSQL database", out)

    assert out["turns_sent"] == 10 and out["sequential_turns"] == 6
    assert out["turns_accepted"] == out["turns_stored"] == 10, out["failures"]
    assert out["turns_failed"] == out["turns_lost"] == out["duplicates"] == 0
    assert out["unexpected_messages"] == out["stored_but_not_accepted"] == 0
    assert out["order_violations"] == 0, out["order_checks"]
    assert out["requests_sent"] == out["turns_accepted"] + out["rejected_409"]
    assert all(n >= 3 for n in out["accepted_per_replica"])  # both served turns
    # system + 3 imported exchanges + 10 turns
    assert out["transcript_messages"] == 1 + 2 * 3 + 2 * 10
    assert out["transcripts_equal"] and out["memory_consistent"]
    assert out["session_turn_per_replica"][0] == out["session_turn_per_replica"][1] > 10
    assert out["memory_tokens"] > 0  # the small window overflowed: memory was read and written
    assert out["sizing"]["sessions"] == 1 and out["sizing"]["memory_tokens_per_session"] > 0
    assert rc == 0
    # both servers were started by the entrypoint, both migrating at once (the migration lock
    # serializes them: one upgrades, the other finds the schema at head), then exec'ing the server
    logs = [(tmp_path / f"replica{i}.log").read_text() for i in range(2)]
    heads = [re.findall(r" -> (\S+) \(head\)", text) for text in logs]
    assert all(len(h) == 1 for h in heads) and heads[0] == heads[1], heads
    assert all("starting the server on 127.0.0.1:" in text for text in logs)
