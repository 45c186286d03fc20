"""Recall benchmark: a fact stated early, pushed out of the window, asked for at the end.

Each JSONL line: ``{"id", "kind", "messages", "answer", "candidates", "answer_template"}``. The
messages before the question are imported into a fresh session (no generation), then the question
is asked with window W. ``mc``: the template filled with each candidate, scored by total
log-probability of the reply; correct if the answer scores highest. ``gen``: the greedy reply
(<= 32 tokens) contains the answer. Conditions: ``window`` (no memory), ``memory``, ``full`` (no
truncation). Prints one JSON object.

    python -m app bench recall FILE [--window 256] [--conditions window,memory,full] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm


def load_cases(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Read a recall JSONL file."""
    cases = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return cases[:limit] if limit else cases


def run_case(
    engine: Any, case: dict[str, Any], window: int, memory: bool, gen: bool
) -> dict[str, Any]:
    """Score one case under one condition; returns its per-case record."""
    from app.engine import SessionOptions

    sid = engine.create_session(options=SessionOptions(window=window, memory_enabled=memory))
    history, question = case["messages"][:-1], case["messages"][-1]["content"]
    engine.import_messages(sid, history)
    replies = [case["answer_template"].format(v=c) for c in case["candidates"]]
    scores = engine.score_replies(sid, question, replies)
    best = max(range(len(scores)), key=scores.__getitem__)
    chosen = case["candidates"][best]
    convo = " ".join(m["content"] for m in history).lower()
    record = {
        "id": case["id"],
        "kind": case.get("kind", "recall"),
        "mc": best == 0,
        "chosen": chosen,
        "wrong_in_conversation": best != 0 and chosen.lower() in convo,
    }
    if gen:
        reply = "".join(engine.chat(sid, question, max_new_tokens=32))
        record["gen"] = case["answer"].lower() in reply.lower()
        record["reply"] = reply
    st = engine.state(sid)
    record["memory_tokens"] = st.memory.token_count()
    return record


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """mc, gen and wrong_in_conversation overall and by kind."""

    def agg(rs: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n": len(rs),
            "mc": round(sum(r["mc"] for r in rs) / max(1, len(rs)), 4),
        }
        if rs and "gen" in rs[0]:
            out["gen"] = round(sum(r["gen"] for r in rs) / len(rs), 4)
        return out

    s = agg(records)
    s["wrong_in_conversation"] = sum(r["wrong_in_conversation"] for r in records)
    s["wrong"] = sum(not r["mc"] for r in records)
    kinds = sorted({r["kind"] for r in records})
    s["by_kind"] = {k: agg([r for r in records if r["kind"] == k]) for k in kinds}
    s["mean_memory_tokens"] = round(
        sum(r["memory_tokens"] for r in records) / max(1, len(records)), 1
    )
    return s


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints the JSON result."""
    ap = argparse.ArgumentParser(prog="bench recall", description=__doc__.split("\n\n")[0])
    ap.add_argument("file", type=Path)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--conditions", default="window,memory,full")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--no-gen", action="store_true", help="skip the greedy replies (mc only)")
    ap.add_argument("--details", action="store_true", help="include per-case records")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--knn-lambda", type=float, default=None)
    ap.add_argument("--knn-temperature", type=float, default=None)
    ap.add_argument("--knn-gate", type=float, default=None)
    ap.add_argument("--knn-copy-lambda", type=float, default=None)
    ap.add_argument("--knn-copy-gate", type=float, default=None)
    ap.add_argument("--decay", type=float, default=None)
    ap.add_argument("--merge-threshold", type=float, default=None)
    ap.add_argument("--reinforce", type=float, default=None)
    ap.add_argument(
        "--exact-max",
        type=int,
        default=None,
        help="entries per store searched exactly (approximate index above: its quality cost)",
    )
    ap.add_argument("--ivf-nprobe", type=int, default=None, help="IVF lists scanned per query")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--weights",
        default=None,
        help="weight format (fp32, bf16, int8, int4); default: the setting",
    )
    ap.add_argument(
        "--knn-roles",
        default="system,user,assistant",
        help="roles whose tokens the kNN read copies",
    )
    args = ap.parse_args(argv)

    import torch

    from app.config import Settings
    from app.db import make_sessionmaker
    from app.engine import Engine
    from app.memory_llama import ReadConfig
    from app.model import load_model
    from memory_store import MemoryParams

    settings = Settings()
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = args.weights or settings.weights
    lm = load_model(settings.model_path, settings.cache_dir, weights=weights)
    read = ReadConfig()
    overrides = {
        "top_k": args.top_k,
        "knn_lambda": args.knn_lambda,
        "knn_temperature": args.knn_temperature,
        "knn_gate": args.knn_gate,
        "knn_copy_lambda": args.knn_copy_lambda,
        "knn_copy_gate": args.knn_copy_gate,
    }
    read = replace(read, **{k: v for k, v in overrides.items() if v is not None})
    params = MemoryParams()
    p_over = {
        "decay": args.decay,
        "merge_threshold": args.merge_threshold,
        "reinforce": args.reinforce,
        "exact_max": args.exact_max,
        "ivf_nprobe": args.ivf_nprobe,
    }
    try:
        params = replace(params, **{k: v for k, v in p_over.items() if v is not None})
    except ValueError as e:
        ap.error(str(e))
    cases = load_cases(args.file, args.limit)
    full_window = int(getattr(lm.model.config, "max_position_embeddings", 8192))
    windows = {
        "window": (args.window, False),
        "memory": (args.window, True),
        "full": (full_window, False),
    }
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    result: dict[str, Any] = {
        "file": str(args.file),
        "n": len(cases),
        "window": args.window,
        "weights": weights,
        "read": asdict(read),
        "knn_roles": args.knn_roles,
        "memory_params": params.to_dict(),
        "conditions": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        db = make_sessionmaker(f"sqlite:///{tmp}/bench.db")
        engine = Engine(
            lm,
            db,
            window=args.window,
            params=params,
            read=read,
            max_new_tokens=32,
            knn_roles=tuple(r.strip() for r in args.knn_roles.split(",")),
        )
        for cond in conditions:
            window, memory = windows[cond]
            t0 = time.time()
            records = [
                run_case(engine, c, window, memory, not args.no_gen)
                for c in tqdm(cases, desc=cond, file=sys.stderr)
            ]
            summary = summarize(records)
            summary["seconds_per_case"] = round((time.time() - t0) / max(1, len(cases)), 2)
            if args.details:
                summary["cases"] = records
            result["conditions"][cond] = summary
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
