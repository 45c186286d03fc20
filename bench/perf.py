"""Decode speed with and without memory, memory read share, turn latency over a long
conversation, write time, and bytes per remembered token.

Side by side in one process, conditions interleaved within each repeat (so a change in machine
load spreads over all of them):

* plain transformers ``generate`` on the same model, float32, unpacked (no memory): the baseline;
* the memchat forward with an empty memory, per weight format (``--formats``, see app/weights.py);
* the memchat forward in the format ``--weights`` with memories of about 1k and 10k tokens (real
  keys/values: text run through the model, written as a live session would);
* optionally llama.cpp (``llama-cpp-python``, if installed) on the bundled GGUF: the outside
  reference;
* ``--batch 1,2,4`` sessions decoding together (`forward_batch`, what the engine's
  `DecodeBatcher` runs for concurrent turns), each reading the smallest memory: summed tokens/s.

Then conversations through the engine (``--turns 10,100,1000``, window ``--window``), one per
checkpoint, history imported up to it; ``--rounds`` rounds of one real turn in each conversation
are timed, the checkpoints interleaved (median per checkpoint, and the ratio per round); memory
writes per turn (p50/p95) come from those turns.

Rates are medians of ``--repeats`` runs: ``tokens_per_s`` by the wall clock and
``tokens_per_cpu_s`` by this process's CPU time (with one thread, much less sensitive to other
processes on the machine). Prints one JSON object.

    python -m app bench perf [--tokens 64] [--sizes 1000,10000] [--threads 1] [--turns 10,100,1000]

``--sizes 1000,10000,100000`` adds a 100k-token memory; filling it runs ~400 forwards of 256
tokens and as many writes (``fill_seconds``; tens of minutes on 2 cores).
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
    """Sentences to fill memory with: the public recall files' messages, else (a checkout without
    ../shared) those of conversations from `bench.gen_hard`. A corpus of a few sentences would
    merge into a few hundred entries per slot and measure a memory far smaller than its tokens."""
    texts: list[str] = []
    for name in ("recall-dev-hard.jsonl", "recall-dev.jsonl"):
        path = SHARED / name
        if path.is_file():
            for line in path.read_text().splitlines():
                texts += [m["content"] for m in json.loads(line)["messages"]]
    if not texts:
        from bench.gen_hard import generate

        texts = [m["content"] for case in generate(cases=60, filler=64) for m in case["messages"]]
    return sorted(set(texts))


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
        window = WindowCache(lm.model, chunk, fp16=True)
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


def _prompt(lm: Any) -> list[int]:
    return list(
        lm.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}],
            add_generation_prompt=True,
        )["input_ids"]
    )


def decode_rate(lm: Any, memory: Any, n_tokens: int, read: Any) -> dict[str, float]:
    """Greedy single-token forwards after a short prompt: tokens/s (wall and CPU time) and the
    memory read's share of the time."""
    import torch

    from app.memory_llama import WindowCache, forward

    prompt = _prompt(lm)
    window = WindowCache(lm.model, len(prompt) + n_tokens + 8, fp16=True)  # as sessions hold it
    out = forward(lm.model, torch.tensor(prompt), window, memory, read, pick=True)
    nxt = out.logits[-1].argmax().view(1)
    read_s = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n_tokens):
        out = forward(lm.model, nxt, window, memory, read, pick=True)  # as the engine decodes
        read_s += out.read_seconds
        nxt = out.logits[-1].argmax().view(1)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "tokens_per_s": round(n_tokens / total, 2),
        "tokens_per_cpu_s": round(n_tokens / cpu, 2),
        "read_share": round(read_s / total, 4),
        "read_ms_per_token": round(1000 * read_s / n_tokens, 3),
    }


def batched_rate(lm: Any, memories: list[Any], n_tokens: int, read: Any) -> dict[str, float]:
    """B sessions (one per memory, None = no memory) decoding together, each step one
    `forward_batch`: tokens/s summed over the sessions (wall and CPU time)."""
    import torch

    from app.memory_llama import WindowCache, forward, forward_batch

    prompt = _prompt(lm)
    windows = [WindowCache(lm.model, len(prompt) + n_tokens + 8, fp16=True) for _ in memories]
    nxt = []
    for w, m in zip(windows, memories, strict=True):
        out = forward(lm.model, torch.tensor(prompt), w, m, read, pick=True)
        nxt.append(int(out.logits[-1].argmax()))
    reads = [read] * len(memories)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n_tokens):
        outs = forward_batch(lm.model, nxt, windows, memories, reads, pick=True)
        nxt = [int(o.logits[-1].argmax()) for o in outs]
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = n_tokens * len(memories)
    return {"tokens_per_s": round(n / total, 2), "tokens_per_cpu_s": round(n / cpu, 2)}


def hf_generate_rate(model: Any, prompt: list[int], n_tokens: int) -> dict[str, float]:
    """Plain transformers ``generate`` (greedy, its own KV cache, no memory)."""
    import torch

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        out = model.generate(ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = out.shape[1] - ids.shape[1]
    return {"tokens_per_s": round(n / total, 2), "tokens_per_cpu_s": round(n / cpu, 2)}


# Run in a child process: a llama.cpp build whose kernels this CPU cannot run dies of SIGILL or
# SIGSEGV at its first decode (both seen on this machine), which would end the whole bench.
_LLAMA_CPP_CHILD = """
import json, sys, time
from llama_cpp import Llama
path, threads, n_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
prompt = json.loads(sys.stdin.read())
llm = Llama(path, n_ctx=1024, n_threads=threads, verbose=False)
llm.eval(prompt)  # the prompt, as the other conditions run it before timing
t0, c0 = time.perf_counter(), time.process_time()
for _ in range(n_tokens):
    llm.eval([llm.sample(temp=0.0)])
print(json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}))
"""


def llama_cpp_rate(
    prompt: list[int], n_tokens: int, threads: int, gguf: Path | None = None
) -> dict[str, Any] | None:
    """llama.cpp (llama-cpp-python) on the bundled GGUF (or `gguf`), greedy, in a child process:
    its rates, None when llama-cpp-python is not installed, or ``{"error": why}`` when the child
    failed (a crash included)."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    if gguf is None:
        from app.model import bundled_gguf_path

        gguf = bundled_gguf_path()
    try:
        child = subprocess.run(
            [sys.executable, "-c", _LLAMA_CPP_CHILD, str(gguf), str(threads), str(n_tokens)],
            input=json.dumps([int(t) for t in prompt]),
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        return {"error": "llama.cpp did not finish in 600 s"}
    if child.returncode != 0:
        how = (
            f"killed by signal {-child.returncode}"
            if child.returncode < 0
            else f"exit status {child.returncode}"
        )
        last = child.stderr.strip().rsplit("\n", 1)[-1]  # its last line of stderr, if any
        return {"error": f"llama.cpp failed ({how}) {last}".strip()}
    timing = json.loads(child.stdout.strip().splitlines()[-1])
    return {
        "tokens_per_s": round(n_tokens / timing["seconds"], 2),
        "tokens_per_cpu_s": round(n_tokens / timing["cpu_seconds"], 2),
    }


# The timed turns, the same at every checkpoint, each decoding exactly --reply-tokens tokens
# (`min_tokens`: the model ended some of these replies after 9 tokens at one checkpoint and not at
# another), so that turns differ by their context, not their length.
_TIMED_PROMPTS = (
    "Write a long story about a lighthouse keeper and a storm.",
    "Describe, in many sentences, how bread is baked from flour to loaf.",
    "Tell me a long tale about a fox who learns to sail.",
)


def turn_latency(
    lm: Any,
    checkpoints: list[int],
    window: int,
    reply_tokens: int,
    rounds: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Conversations through the engine (SQLite, the service's memory defaults), one per
    checkpoint with history imported up to it, then ``rounds`` rounds of one real turn in each
    (`_TIMED_PROMPTS` in turn): the checkpoints' turns interleaved, so a change in machine load
    during the run spreads over all of them instead of landing on one checkpoint's median."""
    import resource

    from app.db import make_sessionmaker
    from app.engine import Engine
    from memory_store import MemoryParams

    rng = random.Random(seed)
    corpus = _corpus()
    out: dict[str, Any] = {"window": window, "reply_tokens": reply_tokens, "at": {}}
    writes: list[float] = []
    points = sorted(checkpoints)
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(
            lm,
            make_sessionmaker(f"sqlite:///{tmp}/perf.db"),
            window=window,
            params=MemoryParams(),
            max_new_tokens=reply_tokens,
            max_cached_sessions=max(16, len(points)),  # no reload inside a timed turn
        )
        sids: dict[int, str] = {}
        for point in points:
            history: list[dict[str, str]] = []
            while len(history) // 2 < point - 1:
                history += [
                    {"role": "user", "content": rng.choice(corpus)},
                    {"role": "assistant", "content": rng.choice(corpus)},
                ]
            sids[point] = engine.create_session()
            t0 = time.perf_counter()
            for i in range(0, len(history), 100):
                engine.import_messages(sids[point], history[i : i + 100])
            out["at"][str(point)] = {"import_seconds": round(time.perf_counter() - t0, 1)}
        times: dict[int, list[float]] = {p: [] for p in points}
        replies: dict[int, list[int]] = {p: [] for p in points}
        # per checkpoint: time to the first reply token, the memory read's and the end of turn's
        # (memory upkeep and the commit) seconds of each turn
        parts: dict[int, dict[str, list[float]]] = {
            p: {"first_token": [], "read": [], "end_of_turn": []} for p in points
        }
        for r in range(rounds):
            prompt = _TIMED_PROMPTS[r % len(_TIMED_PROMPTS)]
            for point in points:
                t = engine.chat(
                    sids[point], prompt, max_new_tokens=reply_tokens, min_tokens=reply_tokens
                )
                "".join(t)
                assert t.stats is not None
                times[point].append(t.stats.seconds)
                parts[point]["first_token"].append(t.stats.first_token_seconds or 0.0)
                parts[point]["read"].append(t.stats.read_seconds)
                parts[point]["end_of_turn"].append(t.stats.write_seconds)
                replies[point].append(t.stats.completion_tokens)
                writes.append(t.stats.memory_write_seconds)
        for point in points:
            st = engine.state(sids[point])
            out["at"][str(point)] |= {
                "turn_seconds": round(statistics.median(times[point]), 4),
                **{
                    f"{name}_seconds": round(statistics.median(xs), 4)
                    for name, xs in parts[point].items()
                },
                "reply_tokens": replies[point],
                "memory_tokens": st.memory.token_count(),
                "memory_entries": st.memory.entry_count(),
                "session_ram_bytes": int(st.memory.nbytes() + _cache_bytes(st.cache)),
            }
            engine.delete_session(sids[point])
    if len(points) > 1:
        first, last = (times[p] for p in (points[0], points[-1]))
        out[f"ratio_turn_{points[-1]}_to_{points[0]}"] = round(
            statistics.median(last) / statistics.median(first), 3
        )
        # the same ratio round by round (turns timed seconds apart): its spread shows the noise
        per_round = sorted(b / a for a, b in zip(first, last, strict=True))
        out[f"ratio_turn_{points[-1]}_to_{points[0]}_per_round"] = [round(x, 3) for x in per_round]
    out["memory_write_ms"] = {
        "p50": round(1000 * float(np.percentile(writes, 50)), 2),
        "p95": round(1000 * float(np.percentile(writes, 95)), 2),
        "n": len(writes),
    }
    out["process_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _cache_bytes(cache: Any) -> int:
    return int(
        sum(t.numel() * t.element_size() for t in (cache.keys, cache.keys_rot, cache.values))
    )


def scanned_bytes(memory: Any) -> dict[str, int]:
    """Bytes an exact read streams per decoded token: every exactly searched slot's key column
    (all layers) and the kNN store's codes (when its index is exact), and how many slots
    are searched approximately instead (IVF/HNSW, not counted). With the read's time this gives
    the bandwidth the read reached, a floor for what an exact read can cost."""
    keys = knn = approx = 0
    for layer in memory.slots:
        for slot in layer:
            if slot.index.kind == "flat":
                keys += slot.col("key").nbytes
            else:
                approx += 1
    if memory.knn.index.kind == "flat":  # its scan reads int8 codes of the hidden states
        knn = memory.knn.blocked.view().nbytes
    return {"keys": keys, "knn": knn, "approximate_slots": approx}


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
    ap.add_argument(
        "--formats", default="fp32,bf16,int8,int4", help="weight formats without memory"
    )
    ap.add_argument("--weights", default="int4", help="weight format of the memory conditions")
    ap.add_argument("--repeats", type=int, default=3, help="runs per condition (median reported)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--turns", default="10,100,1000", help="checkpoints of the long conversation")
    ap.add_argument("--window", type=int, default=1024, help="window of the long conversation")
    ap.add_argument("--reply-tokens", type=int, default=16)
    ap.add_argument(
        "--rounds", type=int, default=5, help="timed turns per checkpoint, checkpoints interleaved"
    )
    ap.add_argument(
        "--batch",
        default="1,2,4",
        help="sessions decoding together (forward_batch), each with the smallest memory size",
    )
    args = ap.parse_args(argv)
    counts = ("tokens", "repeats", "threads", "window", "reply_tokens", "rounds")
    if min(getattr(args, c) for c in counts) < 1:
        ap.error(", ".join(f"--{c.replace('_', '-')}" for c in counts) + " must be at least 1")

    import torch
    from transformers import LlamaForCausalLM

    from app.config import Settings
    from app.engine import single_threaded_search
    from app.fused import compile_fused
    from app.memory_llama import ReadConfig, compile_attention
    from app.model import load_model, resolve_model_dir
    from memory_store import MemoryParams, SessionMemory
    from memory_store.kernels import compile_kernels

    settings = Settings()
    torch.set_num_threads(args.threads)
    single_threaded_search()  # as the engine runs it
    formats = [f for f in args.formats.split(",") if f]
    models = {
        f: load_model(settings.model_path, settings.cache_dir, weights=f)
        for f in dict.fromkeys(formats + [args.weights])
    }
    lm = models[args.weights]
    plain = LlamaForCausalLM.from_pretrained(
        resolve_model_dir(settings.model_path, settings.cache_dir), local_files_only=True
    ).eval()
    cfg = lm.model.config
    params = MemoryParams()
    read = ReadConfig()
    prompt = _prompt(lm)

    result: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "tokens": args.tokens,
        "model": lm.name,
        "weights": args.weights,
    }
    n_kv = int(cfg.num_key_value_heads or cfg.num_attention_heads)
    compile_kernels(n_kv)  # as the engine does at start: no compile inside a timed run
    compile_attention()
    compile_fused()
    memories: dict[int, tuple[Any, float, float]] = {}  # size -> (memory, write s, fill s)
    for size in [int(s) for s in args.sizes.split(",") if s]:
        mem = SessionMemory(cfg.num_hidden_layers, n_kv, 64, cfg.hidden_size, params)
        print(f"filling memory to {size} tokens", file=sys.stderr)
        t_fill = time.perf_counter()
        write_s = fill_memory(lm, mem, size)
        memories[size] = (mem, write_s, time.perf_counter() - t_fill)

    runs: dict[str, list[dict[str, float]]] = {"transformers": [], "llama_cpp": []}
    for f in formats:
        runs[f"no_memory_{f}"] = []
    for size in memories:
        runs[f"memory_{size}"] = []
    batches = [int(b) for b in args.batch.split(",") if b]
    for b in batches:
        runs[f"batch_{b}"] = []
    for r in range(args.repeats):
        print(f"decode runs {r + 1}/{args.repeats}", file=sys.stderr)
        runs["transformers"].append(hf_generate_rate(plain, prompt, args.tokens))
        if "llama_cpp_error" not in result:
            ref = llama_cpp_rate(prompt, args.tokens, args.threads)
            if ref is not None and "error" in ref:
                result["llama_cpp_error"] = ref["error"]  # reported; not tried again
            elif ref is not None:
                runs["llama_cpp"].append(ref)
        for f in formats:
            runs[f"no_memory_{f}"].append(decode_rate(models[f], None, args.tokens, read))
        for size, (mem, _, _) in memories.items():
            runs[f"memory_{size}"].append(decode_rate(lm, mem, args.tokens, read))
        smallest = memories[min(memories)][0] if memories else None
        for b in batches:  # the sessions share one memory object: reads leave it unchanged
            runs[f"batch_{b}"].append(batched_rate(lm, [smallest] * b, args.tokens, read))

    def median_of(rs: list[dict[str, float]]) -> dict[str, float]:
        return {k: statistics.median(r[k] for r in rs) for k in rs[0]}

    hf = median_of(runs["transformers"])
    result["transformers_generate"] = hf
    if runs["llama_cpp"]:
        result["llama_cpp"] = median_of(runs["llama_cpp"])

    def ratios(rate: dict[str, float]) -> dict[str, float]:
        out = {
            "ratio_to_transformers": round(rate["tokens_per_s"] / hf["tokens_per_s"], 3),
            "cpu_ratio_to_transformers": round(
                rate["tokens_per_cpu_s"] / hf["tokens_per_cpu_s"], 3
            ),
        }
        if "llama_cpp" in result:
            out["ratio_to_llama_cpp"] = round(
                rate["tokens_per_s"] / result["llama_cpp"]["tokens_per_s"], 3
            )
        return out

    result["no_memory"] = {}
    for f in formats:
        rate = median_of(runs[f"no_memory_{f}"])
        result["no_memory"][f] = {**rate, **ratios(rate)}
    base = median_of(runs[f"no_memory_{args.weights}"]) if args.weights in formats else None
    result["memory"] = {}
    for size, (mem, write_s, fill_s) in memories.items():
        rate = median_of(runs[f"memory_{size}"])
        tokens = mem.token_count()
        entry = {"tokens": tokens, "entries": mem.entry_count(), **rate, **ratios(rate)}
        if base is not None:
            entry["ratio_to_no_memory"] = round(rate["tokens_per_s"] / base["tokens_per_s"], 3)
        entry |= {
            "write_seconds_per_256_tokens": round(write_s, 4),
            "fill_seconds": round(fill_s, 1),
            "ram_bytes_per_token": round(mem.nbytes() / tokens),
            "scanned_bytes_per_token": (scanned := scanned_bytes(mem)),
            # the read's bytes over its time: near the core's memory bandwidth, only fewer bytes
            # scanned (approximate search) make the read faster
            "read_gb_per_s": round(
                (scanned["keys"] + scanned["knn"]) / max(rate["read_ms_per_token"], 1e-9) / 1e6, 2
            ),
            "sql_bytes_per_token": round(sql_bytes(mem, params) / tokens),
        }
        result["memory"][str(size)] = entry
    if batches:
        single = median_of(runs[f"batch_{batches[0]}"])
        result["batched"] = {
            "memory_tokens": min(memories) if memories else 0,
            **{
                str(b): {
                    **(rate := median_of(runs[f"batch_{b}"])),
                    f"ratio_to_batch_{batches[0]}": round(
                        rate["tokens_per_s"] / single["tokens_per_s"], 3
                    ),
                }
                for b in batches
            },
        }
    memories.clear()
    checkpoints = [int(t) for t in args.turns.split(",") if t]
    if checkpoints:
        print(f"long conversation to turn {max(checkpoints)}", file=sys.stderr)
        result["turns"] = turn_latency(
            lm, checkpoints, args.window, args.reply_tokens, rounds=args.rounds
        )
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
