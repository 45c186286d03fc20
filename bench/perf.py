"""Decode speed with and without memory, memory read share, and bytes per remembered token.

Side by side in one process: plain transformers ``generate`` (no memory), the memchat forward with
an empty memory, and with memories of about 1k and 10k tokens (real keys/values: text run through
the model, written as a live session would). Prints one JSON object.

    python -m app bench perf [--tokens 64] [--sizes 1000,10000] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "bench"


def _corpus() -> list[str]:
    """Sentences to fill memory with: the public recall files' messages, else a built-in list."""
    texts: list[str] = []
    for name in ("recall-dev-hard.jsonl", "recall-dev.jsonl"):
        path = SHARED / name
        if path.is_file():
            for line in path.read_text().splitlines():
                texts += [m["content"] for m in json.loads(line)["messages"]]
    return sorted(set(texts)) or ["The quick brown fox jumps over the lazy dog."]


def fill_memory(lm: Any, memory: Any, n_tokens: int, chunk: int = 256, seed: int = 0) -> float:
    """Run shuffled text through the model (no memory read) and write its keys/values and hidden
    states to ``memory`` until it holds ``n_tokens`` tokens; returns seconds per write call."""
    import torch

    from app.memory_llama import ReadConfig, WindowCache, forward

    rng = random.Random(seed)
    corpus = _corpus()
    tok = lm.tokenizer
    write_times = []
    msg = 0
    while memory.token_count() < n_tokens:
        text = " ".join(rng.choice(corpus) for _ in range(40))
        ids = tok.encode(text, add_special_tokens=False)[:chunk]
        window = WindowCache(lm.model, chunk, round_fp16=True)
        out = forward(lm.model, torch.tensor(ids), window, None, ReadConfig(knn_lambda=0.0))
        keys = window.keys[:, :, : len(ids)].float().numpy()
        values = window.values[:, :, : len(ids)].float().numpy()
        token_ids = np.asarray(ids, dtype=np.int64)
        seqs = np.full(len(ids), msg, dtype=np.int64)
        pos = np.arange(len(ids), dtype=np.int32)
        memory.set_turn(msg)
        t0 = time.perf_counter()
        memory.write(keys, values, token_ids, seqs, pos)
        memory.write_knn(
            out.hidden.float().numpy(), np.append(token_ids[1:], 2), token_ids, seqs, pos
        )
        write_times.append(time.perf_counter() - t0)
        msg += 1
    return statistics.median(write_times)


def decode_rate(lm: Any, memory: Any, n_tokens: int, read: Any) -> dict[str, float]:
    """Greedy single-token forwards after a short prompt; tokens/s and the memory read share."""
    import torch

    from app.memory_llama import WindowCache, forward

    prompt = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}],
        add_generation_prompt=True,
    )["input_ids"]
    window = WindowCache(lm.model, len(prompt) + n_tokens + 8)
    out = forward(lm.model, torch.tensor(prompt), window, memory, read)
    nxt = out.logits[-1].argmax().view(1)
    read_s = 0.0
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        out = forward(lm.model, nxt, window, memory, read)
        read_s += out.read_seconds
        nxt = out.logits[-1].argmax().view(1)
    total = time.perf_counter() - t0
    return {"tokens_per_s": round(n_tokens / total, 2), "read_share": round(read_s / total, 4)}


def hf_generate_rate(lm: Any, n_tokens: int) -> float:
    """Plain transformers ``generate`` (greedy, KV cache, no memory): tokens/s."""
    import torch

    ids = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}],
        add_generation_prompt=True,
        return_tensors="pt",
    )["input_ids"]
    with torch.inference_mode():
        lm.model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = lm.model.generate(
            ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False
        )
        total = time.perf_counter() - t0
    return round((out.shape[1] - ids.shape[1]) / total, 2)


def sql_bytes(memory: Any, params: Any) -> int:
    """Bytes the memory takes in a fresh SQLite file."""
    from sqlalchemy.orm import sessionmaker

    from app.db import make_engine
    from memory_store.models import ChatSession
    from memory_store.persistence import create_schema, save_memory

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.db"
        engine = make_engine(f"sqlite:///{path}")
        create_schema(engine)
        maker = sessionmaker(engine)
        with maker.begin() as db:
            db.add(ChatSession(id="perf", window=256, params={}, model="x", turn=0))
            db.flush()
            save_memory(db, "perf", memory)
        engine.dispose()
        return path.stat().st_size + sum(p.stat().st_size for p in Path(tmp).glob("m.db-*"))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints the JSON result."""
    ap = argparse.ArgumentParser(prog="bench perf")
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per measurement")
    ap.add_argument("--sizes", default="1000,10000", help="memory sizes in tokens")
    ap.add_argument("--repeats", type=int, default=3, help="runs per condition (median reported)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import torch

    from app.config import Settings
    from app.memory_llama import ReadConfig
    from app.model import load_model
    from memory_store import MemoryParams, SessionMemory

    settings = Settings()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(settings.model_path, settings.cache_dir)
    cfg = lm.model.config
    params = MemoryParams()
    read = ReadConfig()

    def median_of(fn: Any) -> dict[str, float]:
        runs = [fn() for _ in range(args.repeats)]
        return {k: statistics.median(r[k] for r in runs) for k in runs[0]}

    result: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "tokens": args.tokens,
        "model": lm.name,
    }
    hf = statistics.median(hf_generate_rate(lm, args.tokens) for _ in range(args.repeats))
    result["transformers_generate_tokens_per_s"] = hf
    result["no_memory"] = median_of(lambda: decode_rate(lm, None, args.tokens, read))
    result["memory"] = {}
    for size in [int(s) for s in args.sizes.split(",") if s]:
        n_kv = int(cfg.num_key_value_heads or cfg.num_attention_heads)
        mem = SessionMemory(cfg.num_hidden_layers, n_kv, 64, cfg.hidden_size, params)
        print(f"filling memory to {size} tokens", file=sys.stderr)
        write_s = fill_memory(lm, mem, size)
        rate = median_of(lambda mem=mem: decode_rate(lm, mem, args.tokens, read))
        tokens = mem.token_count()
        result["memory"][str(size)] = {
            "tokens": tokens,
            "entries": mem.entry_count(),
            **rate,
            "ratio_to_transformers": round(rate["tokens_per_s"] / hf, 3),
            "ratio_to_no_memory": round(
                rate["tokens_per_s"] / result["no_memory"]["tokens_per_s"], 3
            ),
            "write_seconds_per_256_tokens": round(write_s, 4),
            "ram_bytes_per_token": round(mem.nbytes() / tokens),
            "sql_bytes_per_token": round(sql_bytes(mem, params) / tokens),
        }
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
