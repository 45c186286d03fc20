"""The chat engine: one session's working window and memory, one turn end to end.

A turn: the user's message is encoded and run after the window (reading memory in every layer);
the reply is generated token by token; messages that no longer fit in the window move to memory
(their keys/values as computed when they were processed); strengths decay, entries are reinforced
by the attention they got and evicted under the budget; then messages, window states and memory
changes are committed in one transaction. If anything fails before the commit, the session's
cached state is dropped and reloaded from the database: it is as it was after its last whole turn.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import faiss
import numpy as np
import threadpoolctl
import torch
from sqlalchemy import delete, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import sessionmaker

from app.chat_format import ChatFormat, EncodedMessage
from app.fused import compile_fused
from app.memory_llama import (
    ForwardOutput,
    ReadConfig,
    WindowCache,
    compile_attention,
    forward,
    forward_batch,
)
from app.model import LoadedModel
from memory_store import EntryReads, MemoryParams, SessionMemory
from memory_store.errors import InvalidExport, SessionNotFound
from memory_store.kernels import compile_kernels
from memory_store.models import LOCAL_TENANT_ID, Base, ChatSession, Message
from memory_store.persistence import (
    delete_message_state,
    load_memory,
    load_message_states,
    save_memory,
    save_message_state,
)
from memory_store.transfer import export_session, import_session

ROLES = ("system", "user", "assistant")
log = logging.getLogger("memchat.engine")


def single_threaded_search() -> None:
    """Run the memory search on the calling thread (what the engine does; benchmarks too)."""
    # The read searches a few queries at a time: FAISS's thread pool costs more than it saves
    # (7x slower per search on 2 busy cores, measured).
    faiss.omp_set_num_threads(1)
    # Likewise numpy's BLAS (OpenBLAS), which the exact memory search uses: its threads wait
    # for a busy core on every small product (10x slower at 5k keys x 3 queries, measured).
    threadpoolctl.threadpool_limits(1, user_api="blas")


class WindowTooSmall(ValueError):
    """A message does not fit in the session's working window even after evicting the rest."""


class SessionBusy(RuntimeError):
    """Another turn held the session for longer than the engine's wait bound."""


class MessageNotFound(LookupError):
    """The session has no message with this id."""


class PinnedMessage(ValueError):
    """The message is pinned in the window (the system prompt) and cannot be forgotten."""


class _LockTable:
    """One lock per session id in this process, dropped once nobody holds or waits for it."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str, timeout: float) -> Iterator[None]:
        with self._mu:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            if not lock.acquire(timeout=max(0.0, timeout)):
                raise SessionBusy(
                    f"session {key} is busy with another turn; tried for {timeout:.0f} s"
                )
            try:
                yield
            finally:
                lock.release()
        finally:
            with self._mu:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


@dataclass
class _Step:
    """One session's decoding step waiting for a batch."""

    window: WindowCache
    memory: SessionMemory | None
    read: ReadConfig
    token: int
    result: ForwardOutput | None = None
    error: BaseException | None = None
    done: bool = False


class DecodeBatcher:
    """Runs the decoding steps of sessions that decode at the same time as one batched forward
    (`forward_batch`): the weights are read once per step for up to ``max_batch`` sessions.

    Turns in their decoding loop register (`decoding`); a step waits at most ``wait_s`` for the
    other registered turns' steps, so a lone turn never waits. Leader-follower: the first thread
    to find no batch running gathers one and runs it on its own thread, the others sleep until
    their step is done. ``max_batch`` 1 runs every step on its own.
    """

    def __init__(self, model: Any, max_batch: int = 4, wait_s: float = 0.004) -> None:
        self.model = model
        self.max_batch = max_batch
        self.wait_s = wait_s
        self._cond = threading.Condition()
        self._queue: list[_Step] = []
        self._active = 0  # turns inside `decoding`
        self._busy = False  # a leader is gathering or running a batch
        self.batch_sizes: dict[int, int] = {}  # batches run, by size (for tests and metrics)

    @contextmanager
    def decoding(self) -> Iterator[None]:
        """Mark the calling turn as decoding (its steps are worth waiting for)."""
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def step(
        self, window: WindowCache, memory: SessionMemory | None, read: ReadConfig, token: int
    ) -> ForwardOutput:
        """Run ``token`` after ``window`` reading ``memory``; the window gains the token."""
        req = _Step(window, memory, read, token)
        if self.max_batch <= 1:
            self._run([req])  # batching off: no queue, no lock
        else:
            self._lead_or_wait(req)
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    def _lead_or_wait(self, req: _Step) -> None:
        """Queue ``req`` and return once it is done: run batches while no other thread does."""
        with self._cond:
            self._queue.append(req)
            self._cond.notify_all()
            while not req.done:
                if self._busy:
                    self._cond.wait()
                    continue
                self._busy = True  # lead: gather the steps of the other decoding turns
                deadline = time.monotonic() + self.wait_s
                while len(self._queue) < min(self._active, self.max_batch):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = self._queue[: self.max_batch]
                del self._queue[: len(batch)]
                self._cond.release()
                try:
                    self._run(batch)
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()

    def _run(self, batch: list[_Step]) -> None:
        self.batch_sizes[len(batch)] = self.batch_sizes.get(len(batch), 0) + 1
        if len(batch) > 1:
            try:
                outs = forward_batch(
                    self.model,
                    [r.token for r in batch],
                    [r.window for r in batch],
                    [r.memory for r in batch],
                    [r.read for r in batch],
                    pick=True,
                )
                for r, out in zip(batch, outs, strict=True):
                    r.result, r.done = out, True
                return
            except Exception:  # noqa: BLE001 - each step again on its own: the error is its owner's
                log.debug("batched step failed; running its steps one by one", exc_info=True)
        for r in batch:
            try:
                r.result = forward(
                    self.model,
                    torch.tensor([r.token]),
                    r.window,
                    r.memory,
                    r.read,
                    logits_from=-1,
                    pick=True,
                )
            except BaseException as exc:  # handed to the step's own thread
                r.error = exc
            r.done = True


@dataclass
class WindowEntry:
    """A message in the working window; its keys/values sit in the WindowCache at start..end."""

    seq: int
    role: str
    token_ids: np.ndarray  # (T,)
    content_mask: np.ndarray  # (T,) bool
    hidden: torch.Tensor  # (T, Dm) final hidden states, for the output-level memory
    start: int
    pinned: bool = False

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass
class PendingMessage:
    """A message created in the current turn, written to SQL at the commit."""

    seq: int
    role: str
    content: str
    turn: int
    n_tokens: int


@dataclass
class SessionState:
    """What a session holds in RAM between turns (a cache of its rows)."""

    session_id: str
    window_size: int
    memory_enabled: bool
    read: ReadConfig
    cache: WindowCache
    entries: list[WindowEntry]
    memory: SessionMemory
    turn: int
    next_seq: int
    # per turn, reset at its start
    pending: list[PendingMessage] = field(default_factory=list)
    new_states: list[int] = field(default_factory=list)  # seqs whose window state must be saved
    evicted: list[int] = field(default_factory=list)  # seqs moved out of the window this turn
    memory_write_s: float = 0.0  # seconds this turn spent writing evicted tokens to memory
    forgotten: list[int] = field(default_factory=list)  # seqs whose states were forgotten
    mass: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    last_read: ReadReport | None = None  # what the memory read gave attention to last turn


BANDS = ("lower", "middle", "upper")


@dataclass
class ReadReport:
    """Attention mass the memory read gave, per message and per remembered token.

    ``messages[seq]`` and ``tokens[(seq, position)]`` hold the mass per layer band (lower,
    middle, upper third of the layers), summed over KV heads, query heads and query tokens;
    ``token_ids[(seq, position)]`` is the token there. ``queries`` is the number of query tokens
    and ``heads`` the attention heads per layer: the mass a memory could get at most is
    ``queries * heads * layers``.
    """

    messages: dict[int, np.ndarray]
    tokens: dict[tuple[int, int], np.ndarray]
    token_ids: dict[tuple[int, int], int]
    queries: int
    heads: int
    layers: int

    def top_messages(self, n: int) -> list[tuple[int, float]]:
        """The ``n`` messages that received the most mass, as (seq, mass)."""
        ranked = sorted(self.messages.items(), key=lambda kv: -float(kv[1].sum()))
        return [(seq, float(m.sum())) for seq, m in ranked[:n]]

    @property
    def total(self) -> float:
        return float(sum(float(m.sum()) for m in self.messages.values()))


@dataclass(frozen=True)
class ImportReport:
    """What a history import stored, and the session's figures right after it."""

    message_ids: list[int]
    turn: int
    memory_entries: int
    memory_tokens: int


@dataclass(frozen=True)
class TurnStats:
    """Figures of one turn, for usage reports and benchmarks."""

    prompt_tokens: int
    completion_tokens: int
    memory_entries: int
    memory_tokens: int
    read_seconds: float
    write_seconds: float  # end-of-turn memory upkeep and the commit
    # evicted tokens written to memory during the turn, and the end-of-turn upkeep (no SQL)
    memory_write_seconds: float
    seconds: float
    first_token_seconds: float | None
    finish_reason: str
    user_message_id: int
    reply_message_id: int
    read: ReadReport | None


class Turn:
    """A turn in progress: iterate for the reply's text pieces; ``stats`` is set once it ended.

    Closing it early (``close()``) ends the turn with what was generated so far, committed.
    """

    def __init__(self, run: Callable[[Turn], Generator[str, None, None]]) -> None:
        self.stats: TurnStats | None = None
        self._it = run(self)

    def __iter__(self) -> Turn:
        return self

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        """Stop generating; the turn is committed with the reply so far."""
        self._it.close()


@dataclass(frozen=True)
class RememberedMessage:
    """What memory holds of one message (strengths at the session's current turn)."""

    message_id: int
    role: str
    content: str
    turn: int  # the turn the message belongs to
    tokens: int  # remembered tokens (output-level entries)
    entries: int  # key/value entries over all layers and KV heads
    mean_strength: float
    min_strength: float
    turn_written: int
    age_turns: int
    attention: float  # attention mass its entries received so far


@dataclass(frozen=True)
class MemoryOverview:
    """A session's memory and window at its current turn; ``messages`` is one page."""

    turn: int
    entries: int
    tokens: int
    bytes: int
    capacity: int
    window_size: int
    window_tokens: int
    window_message_ids: list[int]
    total_messages: int
    messages: list[RememberedMessage]


@dataclass(frozen=True)
class SessionOptions:
    """Per-session choices; anything left None takes the engine's default."""

    window: int | None = None
    system_prompt: str | None = None
    params: MemoryParams | None = None
    read: ReadConfig | None = None
    memory_enabled: bool = True


class Engine:
    """Runs turns of many sessions on one model; sessions are cached in RAM (LRU)."""

    def __init__(
        self,
        lm: LoadedModel,
        db: sessionmaker[DbSession],
        window: int = 1024,
        params: MemoryParams | None = None,
        read: ReadConfig | None = None,
        max_new_tokens: int = 256,
        max_cached_sessions: int = 16,
        knn_roles: tuple[str, ...] = ("system", "user", "assistant"),
        lock_timeout: float = 30.0,
        decode_batch: int = 4,
    ) -> None:
        self.lm = lm
        self.model = lm.model
        self.fmt = ChatFormat(lm.tokenizer)
        # the end-of-message ids as a tensor: what `min_tokens` keeps from being picked
        self.stop_id_tensor = torch.tensor(sorted(self.fmt.stop_ids), dtype=torch.long)
        self.db = db
        self.window = window
        self.params = params or MemoryParams()
        self.read = read or ReadConfig()
        self.max_new_tokens = max_new_tokens
        self.max_cached_sessions = max_cached_sessions
        self.knn_roles = knn_roles  # whose tokens the output-level read may copy
        self.lock_timeout = lock_timeout
        # decoding steps of concurrent turns share forward passes (see DecodeBatcher)
        self.batcher = DecodeBatcher(self.model, max_batch=decode_batch)
        self._cache: OrderedDict[str, SessionState] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._locks = _LockTable()
        self._held = threading.local()  # session ids this thread holds (leases nest)
        cfg = self.model.config
        self.n_layers = cfg.num_hidden_layers
        self.n_kv = int(cfg.num_key_value_heads or cfg.num_attention_heads)
        self.head_dim = int(
            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        )
        self.hidden_dim = cfg.hidden_size
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 8192))
        single_threaded_search()
        compile_kernels(self.n_kv)  # now, not in a user's first turn
        compile_attention()
        compile_fused()

    # ----- sessions -------------------------------------------------------------------------
    def create_session(
        self,
        name: str | None = None,
        title: str | None = None,
        options: SessionOptions | None = None,
        history: Sequence[dict[str, str]] = (),
        tenant_id: str = LOCAL_TENANT_ID,
    ) -> str:
        """Create a session of ``tenant_id`` and return its id: its row, pinned system block and
        ``history`` (imported as by `import_messages`) in one transaction."""
        _check_roles(history)
        opts = options or SessionOptions()
        window = opts.window or self.window
        if window > self.max_positions:
            raise WindowTooSmall(
                f"window {window} exceeds the model's {self.max_positions} positions"
            )
        params = opts.params or self.params
        read = opts.read or self.read
        sid = uuid.uuid4().hex
        row = ChatSession(
            id=sid,
            tenant_id=tenant_id,
            name=name,
            title=title or "",
            system_prompt=opts.system_prompt,
            window=window,
            params={
                "memory": params.to_dict(),
                "read": asdict(read) | {"collect_mass": True},
                "memory_enabled": opts.memory_enabled,
            },
            model=self.lm.name,
            turn=0,
        )
        state = self._new_state(
            sid, window, opts.memory_enabled, replace(read, collect_mass=True), params
        )
        system = self.fmt.system_block(opts.system_prompt)
        if len(system.token_ids) > window // 2:
            raise WindowTooSmall(
                f"the system prompt takes {len(system.token_ids)} tokens; it may take at most "
                f"half the window ({window // 2})"
            )
        with self._lease(sid, new=True):
            if len(system.token_ids):
                self._process(state, system, pinned=True, content="")
            if history:
                self._import_into(state, history)
            self._commit(state, new_row=row)
        self._remember(state)
        return sid

    def find_session(self, name: str, tenant_id: str = LOCAL_TENANT_ID) -> str | None:
        """Id of the tenant's session with this name, if any (names are unique per tenant)."""
        with self.db() as db:
            return db.scalar(
                select(ChatSession.id).where(
                    ChatSession.name == name, ChatSession.tenant_id == tenant_id
                )
            )

    def session_for_name(
        self,
        name: str,
        options: SessionOptions | None = None,
        history: Sequence[dict[str, str]] = (),
        tenant_id: str = LOCAL_TENANT_ID,
    ) -> tuple[str, bool]:
        """The tenant's session called ``name`` and whether it was created now, with ``options``
        and ``history``, because there was none (two requests creating the same name at once end
        up with the same session, its history imported once)."""
        found = self.find_session(name, tenant_id)
        if found is not None:
            return found, False
        try:
            return self.create_session(
                name=name, title=name, options=options, history=history, tenant_id=tenant_id
            ), True
        except IntegrityError:
            found = self.find_session(name, tenant_id)
            if found is None:
                raise
            return found, False

    def delete_session(self, session_id: str) -> None:
        """Remove the session and everything of it: messages, memory, window states."""
        with self._lease(session_id):
            with self.db.begin() as db:
                for table in reversed(Base.metadata.sorted_tables):
                    if table.name != ChatSession.__tablename__ and "session_id" in table.c:
                        db.execute(delete(table).where(table.c.session_id == session_id))
                db.execute(delete(ChatSession).where(ChatSession.id == session_id))
            self.drop_cached(session_id)

    # ----- inspection and editing ---------------------------------------------------------
    def memory_overview(self, session_id: str, limit: int = 100, offset: int = 0) -> MemoryOverview:
        """The remembered messages (by id, one page) with their strengths, plus totals."""
        with self._lease(session_id):
            st = self.state(session_id)
            stats = st.memory.message_stats()
            page = sorted(stats)[offset : offset + limit]
            with self.db() as db:
                rows = {
                    m.seq: m
                    for m in db.scalars(
                        select(Message).where(
                            Message.session_id == session_id, Message.seq.in_(page)
                        )
                    )
                }
            messages = []
            for seq in page:
                ms, row = stats[seq], rows.get(seq)
                messages.append(
                    RememberedMessage(
                        message_id=seq,
                        role=row.role if row else "system",
                        content=row.content if row else "",
                        turn=row.turn if row else ms.turn_written,
                        tokens=ms.tokens,
                        entries=ms.entries,
                        mean_strength=ms.mean_strength,
                        min_strength=ms.min_strength,
                        turn_written=ms.turn_written,
                        age_turns=st.turn - ms.turn_written,
                        attention=ms.attention,
                    )
                )
            return MemoryOverview(
                turn=st.turn,
                entries=st.memory.entry_count(),
                tokens=st.memory.token_count(),
                bytes=st.memory.nbytes(),
                capacity=st.memory.params.capacity,
                window_size=st.window_size,
                window_tokens=st.cache.length,
                window_message_ids=[e.seq for e in st.entries],
                total_messages=len(stats),
                messages=messages,
            )

    def explain(self, session_id: str, text: str) -> ReadReport:
        """What the memory read attends to when ``text`` is asked as the next user message (a dry
        run: nothing changes)."""
        with self._lease(session_id):
            st = self.state(session_id)
            ids = np.concatenate(
                [self.fmt.encode("user", text).token_ids, self.fmt.generation_header()]
            )
            if len(ids) > st.window_size:
                raise WindowTooSmall(
                    f"the text takes {len(ids)} tokens; the window holds {st.window_size}"
                )
            read: dict[tuple[int, int], EntryReads] = {}
            if st.memory_enabled:
                out = forward(
                    self.model,
                    torch.from_numpy(ids),
                    st.cache,
                    st.memory,
                    replace(st.read, collect_mass=True),
                    commit=False,
                    logits_from=None,
                )
                for layer, lm in enumerate(out.memory_mass or []):
                    for head in range(len(lm.ids)):
                        read[(layer, head)] = st.memory.tally_reads(
                            layer, head, lm.ids[head], lm.mass[head]
                        )
            return self._report(read, len(ids))

    def last_read(self, session_id: str) -> ReadReport | None:
        """What the memory read attended to in the session's last turn (None after a reload)."""
        with self._lease(session_id):
            return self.state(session_id).last_read

    def forget_message(self, session_id: str, message_id: int) -> int:
        """Remove a message's hidden states wherever they are (memory or window); its text stays
        in the transcript. Returns the memory entries removed."""
        with self._lease(session_id):
            st = self.state(session_id)
            with self.db() as db:
                found = db.scalar(
                    select(Message.id).where(
                        Message.session_id == session_id, Message.seq == message_id
                    )
                )
            if found is None:
                raise MessageNotFound(f"session {session_id} has no message {message_id}")
            entry = next((e for e in st.entries if e.seq == message_id), None)
            if entry is not None and entry.pinned:
                raise PinnedMessage(
                    "the system prompt is pinned in the window and cannot be forgotten"
                )
            with self._turn_guard(st):
                if entry is not None:
                    self._drop_from_window(st, [entry])
                removed = st.memory.forget_message(message_id)
                st.forgotten.append(message_id)
                _scrub(st, {message_id})
                self._commit(st)
                return removed

    def forget_all(self, session_id: str) -> int:
        """Remove every remembered hidden state: the memory and the window's messages (the pinned
        system prompt stays); the transcript stays. Returns the memory entries removed."""
        with self._lease(session_id):
            st = self.state(session_id)
            with self._turn_guard(st):
                dropped = [e for e in st.entries if not e.pinned]
                self._drop_from_window(st, dropped)
                st.forgotten.extend(e.seq for e in dropped)
                removed = st.memory.forget_all()
                _scrub(st, None)
                with self.db() as db:
                    st.forgotten += db.scalars(
                        select(Message.seq).where(
                            Message.session_id == session_id, Message.location == "memory"
                        )
                    ).all()
                self._commit(st)
                return removed

    def export(self, session_id: str) -> dict[str, Any]:
        """The session as one portable JSON document (transcript, memory, window states)."""
        with self._lease(session_id), self.db() as db:
            return export_session(db, session_id)

    def import_(
        self, doc: dict[str, Any], name: str | None = None, tenant_id: str = LOCAL_TENANT_ID
    ) -> str:
        """Create a session of ``tenant_id`` from an exported document; all or nothing. Raises
        InvalidExport."""
        shape = [self.n_layers, self.n_kv, self.head_dim, self.hidden_dim]
        session = doc.get("session") if isinstance(doc, dict) else None
        got = session.get("memory_shape") if isinstance(session, dict) else None
        if got is not None and list(got) != shape:
            raise InvalidExport(
                f"the export holds a memory of shape {got}; this server's model "
                f"({self.lm.name}) needs {shape}"
            )
        with self.db.begin() as db:
            return import_session(db, doc, name=name, tenant_id=tenant_id)

    # ----- the per-session lease ----------------------------------------------------------------
    @contextmanager
    def _lease(self, session_id: str, new: bool = False) -> Iterator[None]:
        """Hold the session for one operation: a lock in this process and, on PostgreSQL, a
        transaction-scoped advisory lock so that other server processes wait too. Waits up to
        ``lock_timeout`` seconds, then raises SessionBusy. After locking, a cached state that
        another process has moved past is dropped (it reloads from SQL). Nested leases of one
        thread on one session pass straight through."""
        held: set[str] = self._held.__dict__.setdefault("ids", set())
        if session_id in held:
            yield
            return
        deadline = time.monotonic() + self.lock_timeout
        with self._locks.hold(session_id, self.lock_timeout), self._db_lock(session_id, deadline):
            if not new:
                self._drop_if_stale(session_id)
            held.add(session_id)
            try:
                yield
            finally:
                held.discard(session_id)

    @contextmanager
    def _db_lock(self, session_id: str, deadline: float) -> Iterator[None]:
        bind = self.db.kw.get("bind")
        if bind is None or bind.dialect.name != "postgresql":
            yield  # SQLite: one process writes at a time anyway; the in-process lock is enough
            return
        query = text("SELECT pg_try_advisory_xact_lock(hashtextextended(:key, 0))")
        with bind.connect() as conn, conn.begin():
            while not conn.scalar(query, {"key": f"memchat-session:{session_id}"}):
                if time.monotonic() >= deadline:
                    raise SessionBusy(
                        f"session {session_id} is busy with a turn in another server process"
                    )
                time.sleep(0.05)
            yield  # the lock goes with this transaction

    def _drop_if_stale(self, session_id: str) -> None:
        with self.db() as db:
            saved = db.scalar(select(ChatSession.memory_seq).where(ChatSession.id == session_id))
        if saved is None:
            self.drop_cached(session_id)
            raise SessionNotFound(session_id)
        with self._cache_lock:
            st = self._cache.get(session_id)
            if st is not None and st.memory.storage.seq != saved:
                del self._cache[session_id]

    def state(self, session_id: str) -> SessionState:
        """The session's RAM state, loaded from SQL when it is not cached."""
        with self._cache_lock:
            st = self._cache.get(session_id)
            if st is not None:
                self._cache.move_to_end(session_id)
                return st
        st = self._load(session_id)
        self._remember(st)
        return st

    def cached_memory_entries(self) -> int:
        """Memory entries of the sessions held in RAM (a gauge for the metrics)."""
        with self._cache_lock:
            states = list(self._cache.values())
        return sum(st.memory.entry_count() for st in states)

    def drop_cached(self, session_id: str) -> None:
        """Forget the RAM copy of a session (the next use reloads it from SQL)."""
        with self._cache_lock:
            self._cache.pop(session_id, None)

    def _remember(self, st: SessionState) -> None:
        with self._cache_lock:
            self._cache[st.session_id] = st
            self._cache.move_to_end(st.session_id)
            while len(self._cache) > self.max_cached_sessions:
                self._cache.popitem(last=False)

    def _new_state(
        self, sid: str, window: int, memory_enabled: bool, read: ReadConfig, params: MemoryParams
    ) -> SessionState:
        memory = SessionMemory(self.n_layers, self.n_kv, self.head_dim, self.hidden_dim, params)
        cache = WindowCache(self.model, window, fp16=True)
        return SessionState(sid, window, memory_enabled, read, cache, [], memory, 0, 0)

    def _load(self, sid: str) -> SessionState:
        with self.db() as db:
            row = db.get(ChatSession, sid)
            if row is None:
                raise SessionNotFound(sid)
            p = row.params or {}
            params = MemoryParams.from_dict(p.get("memory", {}))
            read = ReadConfig(**p.get("read", {}))
            st = self._new_state(sid, row.window, bool(p.get("memory_enabled", True)), read, params)
            st.memory = load_memory(
                db, sid, self.n_layers, self.n_kv, self.head_dim, self.hidden_dim, params
            )
            st.turn = row.turn
            st.memory.set_turn(row.turn)
            messages = {
                m.seq: m for m in db.scalars(select(Message).where(Message.session_id == sid))
            }
            st.next_seq = max(messages, default=-1) + 1
            states = load_message_states(db, sid)
        for seq in sorted(states):
            s = states[seq]
            role = messages[seq].role if seq in messages else "system"
            ids = np.asarray(s.token_ids, dtype=np.int64)
            keys = torch.from_numpy(np.asarray(s.keys, dtype=np.float32)).to(self.model.dtype)
            values = torch.from_numpy(np.asarray(s.values, dtype=np.float32)).to(self.model.dtype)
            hidden = torch.from_numpy(np.asarray(s.hidden, dtype=np.float32))
            entry = WindowEntry(
                seq,
                role,
                ids,
                self.fmt.content_mask(role, ids),
                hidden,
                st.cache.length,
                pinned=role == "system" and seq == 0,
            )
            st.cache.append(keys, values)
            st.entries.append(entry)
        st.next_seq = max(st.next_seq, max(states, default=-1) + 1)
        return st

    # ----- the window -----------------------------------------------------------------------
    def _make_room(self, st: SessionState, n: int) -> None:
        """Move the oldest unpinned messages to memory until ``n`` more tokens fit (a reply being
        generated is not a message yet, so it is never the one moved)."""
        need = st.cache.length + n - st.window_size
        if need <= 0:
            return
        victims = []
        for entry in st.entries:
            if need <= 0:
                break
            if not entry.pinned:
                victims.append(entry)
                need -= len(entry.token_ids)
        if need > 0:
            raise WindowTooSmall(
                f"{n} tokens do not fit in a window of {st.window_size} tokens "
                f"({st.cache.length} pinned); shorten the message or enlarge the window"
            )
        self._evict(st, victims)

    def _evict(self, st: SessionState, entries: list[WindowEntry]) -> None:
        """Write the content tokens of ``entries`` (window order) to memory, all in one write
        (the per-slot cost of a write is mostly fixed), then take them out of the window."""
        if st.memory_enabled:
            t0 = time.perf_counter()
            slot_parts: list[
                tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray, np.ndarray]
            ] = []
            knn_parts: list[tuple[np.ndarray, ...]] = []
            for entry in entries:
                mask = entry.content_mask
                if not mask.any():
                    continue
                start, end = entry.start, entry.end
                where = torch.from_numpy(mask)
                slot_parts.append(
                    (
                        st.cache.keys[:, :, start:end][:, :, where],  # (L, H, t, D)
                        st.cache.values[:, :, start:end][:, :, where],
                        entry.token_ids[mask],
                        np.full(int(mask.sum()), entry.seq, dtype=np.int64),
                        np.nonzero(mask)[0].astype(np.int32),
                    )
                )
                # output-level read: each token's final state predicts the token after it; a
                # token followed by a special one (end of message) would teach replies to stop
                nxt_all = np.append(entry.token_ids[1:], entry.token_ids[-1])
                kmask = mask & ~np.isin(nxt_all, list(self.fmt.special_ids))
                if kmask.any() and entry.role in self.knn_roles:
                    knn_parts.append(
                        (
                            entry.hidden[torch.from_numpy(kmask)].float().numpy(),
                            nxt_all[kmask],
                            entry.token_ids[kmask],
                            np.full(int(kmask.sum()), entry.seq, dtype=np.int64),
                            np.nonzero(kmask)[0].astype(np.int32),
                        )
                    )
            if slot_parts:
                st.memory.write(
                    torch.cat([p[0] for p in slot_parts], dim=2).float().numpy(),
                    torch.cat([p[1] for p in slot_parts], dim=2).float().numpy(),
                    np.concatenate([p[2] for p in slot_parts]),
                    np.concatenate([p[3] for p in slot_parts]),
                    np.concatenate([p[4] for p in slot_parts]),
                )
            if knn_parts:
                hidden, nxt, tok, seqs, pos = (
                    np.concatenate(c) for c in zip(*knn_parts, strict=True)
                )
                st.memory.write_knn(hidden, nxt, tok, seqs, pos)
            st.memory_write_s += time.perf_counter() - t0
        self._drop_from_window(st, entries)
        st.evicted.extend(e.seq for e in entries)

    def _drop_from_window(self, st: SessionState, entries: list[WindowEntry]) -> None:
        """Take messages out of the window without remembering them: one re-positioning of the
        window per run of adjacent messages."""
        gone = {id(e) for e in entries}
        runs: list[tuple[int, int]] = []  # (start, end) of adjacent removed messages
        for e in st.entries:
            if id(e) in gone:
                if runs and runs[-1][1] == e.start:
                    runs[-1] = (runs[-1][0], e.end)
                else:
                    runs.append((e.start, e.end))
        for start, end in reversed(runs):  # later runs first: earlier positions stay valid
            st.cache.drop_range(start, end)
        st.entries = [e for e in st.entries if id(e) not in gone]
        for e in st.entries:
            e.start -= sum(end - start for start, end in runs if end <= e.start)

    def _run(
        self,
        st: SessionState,
        ids: np.ndarray,
        commit: bool = True,
        logits_from: int | None = -1,
        pick: bool = False,
    ) -> ForwardOutput:
        """One forward pass after the window (log-probabilities from ``logits_from`` on; the last
        token's by default; ``pick``: they only choose the next token, see `forward`),
        accumulating the memory mass for reinforcement."""
        memory = st.memory if st.memory_enabled else None
        out = forward(
            self.model,
            torch.from_numpy(ids),
            st.cache,
            memory,
            st.read,
            commit=commit,
            logits_from=logits_from,
            pick=pick,
        )
        self._note_mass(st, out)
        return out

    def _step(self, st: SessionState, token: int) -> ForwardOutput:
        """One decoding step (`_run` of one token), batched with other turns' steps."""
        memory = st.memory if st.memory_enabled else None
        out = self.batcher.step(st.cache, memory, st.read, token)
        self._note_mass(st, out)
        return out

    def _note_mass(self, st: SessionState, out: ForwardOutput) -> None:
        """Keep the attention mass the memory entries received, for reinforcement."""
        if out.memory_mass:
            for layer, lm in enumerate(out.memory_mass):
                for head in range(len(lm.ids)):
                    st.mass.setdefault((layer, head), []).append((lm.ids[head], lm.mass[head]))

    def _process(
        self, st: SessionState, enc: EncodedMessage, pinned: bool = False, content: str = ""
    ) -> int:
        """Run a whole message through the model into the window; returns its seq."""
        return self._process_many(st, [(enc, content, st.turn)], pinned)[0]

    def _process_many(
        self, st: SessionState, batch: list[tuple[EncodedMessage, str, int]], pinned: bool = False
    ) -> list[int]:
        """Run consecutive messages (encoded, text, turn) through the model in one forward pass
        (the weights are read once instead of once per message) and add them to the window."""
        return self._process_then(st, batch, pinned)[0]

    def _process_then(
        self,
        st: SessionState,
        batch: list[tuple[EncodedMessage, str, int]],
        pinned: bool = False,
        then: np.ndarray | None = None,
    ) -> tuple[list[int], ForwardOutput | None]:
        """`_process_many`, and in the same forward pass the tokens ``then`` after the messages
        (a reply's header: one pass instead of two, each a few tens of ms whatever its length).
        Returns the messages' seqs and, with ``then``, its output: the last token's
        log-probabilities and the hidden states of ``then``'s tokens."""
        parts = [enc.token_ids for enc, _, _ in batch]
        ids = np.concatenate(parts if then is None else [*parts, then])
        if not pinned:
            self._make_room(st, len(ids))
        start = st.cache.length
        out = self._run(st, ids, logits_from=None if then is None else -1, pick=True)
        seqs = []
        offset = 0
        for enc, content, turn in batch:
            n = len(enc.token_ids)
            seq = st.next_seq
            st.next_seq += 1
            hidden = out.hidden[offset : offset + n]
            offset += n
            st.entries.append(
                WindowEntry(seq, enc.role, enc.token_ids, enc.content_mask, hidden, start, pinned)
            )
            st.pending.append(PendingMessage(seq, enc.role, content, turn, n))
            st.new_states.append(seq)
            seqs.append(seq)
            start += n
        if then is None:
            return seqs, None
        return seqs, replace(out, hidden=out.hidden[offset:])

    # ----- turns ----------------------------------------------------------------------------
    def import_messages(self, session_id: str, messages: Sequence[dict[str, str]]) -> list[int]:
        """Append history without generating: the messages run through the model (a few at a
        time, at most a quarter of the window per pass, so each still sees older context in the
        window), and what overflows the window goes to memory as in a live chat. One transaction
        for the whole import. Returns the new messages' ids."""
        return self.import_history(session_id, messages).message_ids

    def import_history(self, session_id: str, messages: Sequence[dict[str, str]]) -> ImportReport:
        """`import_messages`, with the session's turn and memory size after it, read under the
        same lease (asking again after the commit could find the session busy: a committed import
        must not be reported as refused)."""
        _check_roles(messages)
        with self._lease(session_id):
            st = self.state(session_id)
            with self._turn_guard(st):
                seqs = self._import_into(st, messages)
                self._commit(st)
                return ImportReport(
                    message_ids=seqs,
                    turn=st.turn,
                    memory_entries=st.memory.entry_count(),
                    memory_tokens=st.memory.token_count(),
                )

    def _import_into(self, st: SessionState, messages: Sequence[dict[str, str]]) -> list[int]:
        seqs: list[int] = []
        batch: list[tuple[EncodedMessage, str, int]] = []
        budget = max(1, st.window_size // 4)
        for m in messages:
            enc = self.fmt.encode(m["role"], m["content"])
            if batch and sum(len(e.token_ids) for e, _, _ in batch) + len(enc.token_ids) > budget:
                seqs += self._process_many(st, batch)
                batch = []
            if m["role"] == "user":
                self._begin_turn(st)
            batch.append((enc, m["content"], st.turn))
        if batch:
            seqs += self._process_many(st, batch)
        self._end_turn(st, queries=sum(p.n_tokens for p in st.pending))
        return seqs

    def chat(
        self,
        session_id: str,
        text: str,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        min_tokens: int = 0,
    ) -> Turn:
        """One turn: iterate the result for the reply's text as it is generated; the turn is
        committed when it finishes (a turn closed early commits what was generated). Generation
        ends at the end-of-message token, at ``max_new_tokens`` or when the text reaches one of
        the ``stop`` strings (cut off before it). Before ``min_tokens`` reply tokens the
        end-of-message token is never picked (stop strings still apply), as vLLM's
        ``min_tokens``."""
        if min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")
        return Turn(
            lambda turn: self._chat(
                turn,
                session_id,
                text,
                max_new_tokens,
                temperature,
                top_p,
                seed,
                tuple(stop),
                min_tokens,
            )
        )

    def _chat(
        self,
        turn: Turn,
        session_id: str,
        text: str,
        max_new_tokens: int | None,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: tuple[str, ...],
        min_tokens: int = 0,
    ) -> Generator[str, None, None]:
        limit = max_new_tokens or self.max_new_tokens
        t0 = time.perf_counter()
        with self._lease(session_id):
            st = self.state(session_id)
            with self._turn_guard(st):
                read_s = 0.0
                self._begin_turn(st)
                user = self.fmt.encode("user", text)
                header = self.fmt.generation_header()
                reserve = min(limit, st.window_size // 4)
                self._make_room(st, len(user.token_ids) + len(header) + reserve)
                (user_seq,), after = self._process_then(st, [(user, text, st.turn)], then=header)
                assert after is not None
                out = after
                prompt_tokens = len(user.token_ids) + len(header)
                generator = torch.Generator().manual_seed(seed) if seed is not None else None
                read_s += out.read_seconds
                generated: list[int] = []
                hiddens = [out.hidden]
                sent = ""
                reply_text: str | None = None
                first_token_s: float | None = None
                finish = "length"
                close = self.fmt.close_reply()
                try:
                    with self.batcher.decoding():
                        for _ in range(limit):
                            early = len(generated) < min_tokens
                            nxt = _pick(
                                out.logits[-1],
                                temperature,
                                top_p,
                                generator,
                                forbid=self.stop_id_tensor if early else None,
                            )
                            if nxt in self.fmt.stop_ids:
                                finish = "stop"
                                break
                            generated.append(nxt)
                            text_now = str(
                                self.lm.tokenizer.decode(generated, skip_special_tokens=True)
                            )
                            cut = _find_stop(text_now, stop, len(sent))
                            if cut is not None:
                                text_now = reply_text = text_now[:cut]
                                finish = "stop"
                            ready = len(text_now) - _held_back(text_now, stop)
                            if not text_now.endswith("\ufffd") and ready > len(sent):
                                if first_token_s is None:
                                    first_token_s = time.perf_counter() - t0
                                yield text_now[len(sent) : ready]
                                sent = text_now[:ready]
                            if reply_text is not None:
                                break
                            if st.cache.length + 1 + len(close) > st.window_size:
                                # the reply goes on: older messages move to memory (the reply stays)
                                self._make_room(st, 1 + len(close))
                            out = self._step(st, nxt)
                            read_s += out.read_seconds
                            hiddens.append(out.hidden)
                except GeneratorExit:
                    finish = "cancelled"  # the client stopped reading: keep what was generated
                if reply_text is None:
                    reply_text = str(self.lm.tokenizer.decode(generated, skip_special_tokens=True))
                    if finish == "cancelled":
                        reply_text = sent
                if generated and len(hiddens) == len(generated):
                    # the last token picked was not run yet (stop string or cancel): run it
                    self._make_room(st, 1 + len(close))
                    last = np.asarray(generated[-1:], dtype=np.int64)
                    out = self._run(st, last, logits_from=None)
                    hiddens.append(out.hidden)
                out = self._run(st, close, logits_from=None)
                hiddens.append(out.hidden)
                ids = np.concatenate([header, np.asarray(generated, dtype=np.int64), close])
                seq = st.next_seq
                st.next_seq += 1
                hidden = torch.cat(hiddens)
                mask = self.fmt.content_mask("assistant", ids)
                st.entries.append(
                    WindowEntry(seq, "assistant", ids, mask, hidden, st.cache.length - len(ids))
                )
                st.pending.append(PendingMessage(seq, "assistant", reply_text, st.turn, len(ids)))
                st.new_states.append(seq)
                tw = time.perf_counter()
                self._end_turn(st, queries=prompt_tokens + len(generated))
                memory_write_s = st.memory_write_s + time.perf_counter() - tw
                self._commit(st)
                turn.stats = TurnStats(
                    prompt_tokens=prompt_tokens,
                    completion_tokens=len(generated),
                    memory_entries=st.memory.entry_count(),
                    memory_tokens=st.memory.token_count(),
                    read_seconds=read_s,
                    write_seconds=time.perf_counter() - tw,
                    memory_write_seconds=memory_write_s,
                    seconds=time.perf_counter() - t0,
                    first_token_seconds=first_token_s,
                    finish_reason=finish,
                    user_message_id=user_seq,
                    reply_message_id=seq,
                    read=st.last_read,
                )

    def score_replies(self, session_id: str, question: str, replies: Sequence[str]) -> list[float]:
        """Total log-probability of each reply's content tokens after ``question``, as a live turn
        would see it. Nothing is committed: the RAM state is dropped afterwards."""
        with self._lease(session_id):
            st = self.state(session_id)
            try:
                self._begin_turn(st)
                user = self.fmt.encode("user", question)
                header = self.fmt.generation_header()
                longest = max(len(self.fmt.reply_ids(r)) for r in replies) + len(header)
                self._make_room(st, len(user.token_ids) + longest)
                self._process(st, user, content=question)
                scores = []
                for reply in replies:
                    rid = self.fmt.reply_ids(reply)
                    ids = np.concatenate([header, rid])
                    # logits at i predict token i+1: the reply is predicted from the header end on
                    out = self._run(st, ids, commit=False, logits_from=len(header) - 1)
                    lp = out.logits[:-1]
                    scores.append(float(lp.gather(1, torch.from_numpy(rid).view(-1, 1)).sum()))
                return scores
            finally:
                self.drop_cached(session_id)

    def _begin_turn(self, st: SessionState) -> None:
        st.turn += 1
        st.memory_write_s = 0.0
        st.memory.set_turn(st.turn)

    def _end_turn(self, st: SessionState, queries: int = 0) -> None:
        """Reinforce what was read, note which messages it came from, evict under the budget."""
        # entries may have been evicted since they were read: only live ones are counted
        read = {
            key: st.memory.tally_reads(
                *key,
                np.concatenate([p[0] for p in parts]),
                np.concatenate([p[1] for p in parts]),
                reinforce=True,
            )
            for key, parts in st.mass.items()
        }
        st.last_read = self._report(read, queries)
        st.mass.clear()
        st.memory.evict()

    def _report(self, read: dict[tuple[int, int], EntryReads], queries: int) -> ReadReport:
        """Attribute the mass memory entries received to their messages and tokens: ``read``
        holds per (layer, head) the entries read and their summed mass
        (`SessionMemory.tally_reads`)."""
        heads = int(self.model.config.num_attention_heads)
        report = ReadReport({}, {}, {}, queries, heads, self.n_layers)
        cols: list[list[np.ndarray]] = [[], [], [], [], []]  # message, position, token, band, mass
        for (layer, _), got in read.items():
            layer_band = min(len(BANDS) - 1, layer * len(BANDS) // self.n_layers)
            for col, part in zip(
                cols,
                (
                    got.message_ids,
                    got.positions.astype(np.int64),
                    got.token_ids,
                    np.full(len(got.ids), layer_band),
                    got.mass,
                ),
                strict=True,
            ):
                col.append(part)
        if not cols[0] or sum(len(c) for c in cols[0]) == 0:
            return report
        msg, pos, tok, band, w = (np.concatenate(c) for c in cols)
        # one row per (message, position) and band, summed: a few thousand rows at most, however
        # many (layer, head) slots and reads there were. (message, position) as one int64 key
        # and sums by bincount: a 2-column unique and np.add.at took a third of a turn's upkeep.
        nb = len(BANDS)
        tkeys, tinv = np.unique((msg << 32) | pos, return_inverse=True)  # pos < 2**31
        per_token = np.bincount(tinv * nb + band, weights=w, minlength=len(tkeys) * nb)
        per_token = per_token.reshape(len(tkeys), nb)
        tok_of = np.empty(len(tkeys), dtype=np.int64)
        tok_of[tinv] = tok
        tmsg, tpos = tkeys >> 32, tkeys & 0xFFFFFFFF
        mkeys, minv = np.unique(tmsg, return_inverse=True)
        per_message = np.stack(
            [np.bincount(minv, weights=per_token[:, b], minlength=len(mkeys)) for b in range(nb)],
            axis=1,
        )
        report.messages.update(zip(mkeys.tolist(), per_message, strict=True))
        pairs = list(zip(tmsg.tolist(), tpos.tolist(), strict=True))
        report.tokens.update(zip(pairs, per_token, strict=True))
        report.token_ids.update(zip(pairs, tok_of.tolist(), strict=True))
        return report

    class _Guard:
        def __init__(self, engine: Engine, st: SessionState) -> None:
            self.engine, self.st = engine, st

        def __enter__(self) -> None:
            self.st.pending.clear()
            self.st.new_states.clear()
            self.st.evicted.clear()
            self.st.forgotten.clear()
            self.st.mass.clear()

        def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
            if exc_type is not None:
                # the RAM state is half a turn ahead of SQL: drop it, the next use reloads
                self.engine.drop_cached(self.st.session_id)

    def _turn_guard(self, st: SessionState) -> Engine._Guard:
        return Engine._Guard(self, st)

    def _commit(self, st: SessionState, new_row: ChatSession | None = None) -> None:
        """Write the turn: new messages, window states, evictions, memory changes, in one
        transaction (with the session's row itself when it is new)."""
        with self.db.begin() as db:
            if new_row is not None:
                db.add(new_row)
                db.flush()
            row = db.get(ChatSession, st.session_id)
            if row is None:
                raise SessionNotFound(st.session_id)
            row.turn = st.turn
            in_window = {e.seq for e in st.entries}
            for p in st.pending:
                db.add(
                    Message(
                        session_id=st.session_id,
                        seq=p.seq,
                        role=p.role,
                        content=p.content,
                        turn=p.turn,
                        n_tokens=p.n_tokens,
                        location="window" if p.seq in in_window else "memory",
                    )
                )
            db.flush()
            by_seq = {e.seq: e for e in st.entries}
            for seq in st.new_states:
                e = by_seq.get(seq)
                if e is None:
                    continue  # already evicted within this turn
                save_message_state(
                    db,
                    st.session_id,
                    seq,
                    st.cache.keys[:, :, e.start : e.end].float().numpy(),
                    st.cache.values[:, :, e.start : e.end].float().numpy(),
                    e.hidden.float().numpy(),
                    e.token_ids,
                )
            new = set(st.new_states)
            for seq in st.evicted:
                if seq not in new:
                    delete_message_state(db, st.session_id, seq)
                msg = db.scalar(
                    select(Message).where(Message.session_id == st.session_id, Message.seq == seq)
                )
                if msg is not None:
                    msg.location = "memory" if st.memory_enabled else "dropped"
            if st.forgotten:
                for seq in st.forgotten:
                    delete_message_state(db, st.session_id, seq)
                db.execute(
                    update(Message)
                    .where(Message.session_id == st.session_id, Message.seq.in_(st.forgotten))
                    .values(location="forgotten")
                )
            save_memory(db, st.session_id, st.memory)
            pause = os.environ.get("MEMCHAT_TEST_PAUSE_BEFORE_COMMIT")
            if pause:  # test-only hook: tests/reliability/test_crash.py kills the server here
                db.flush()
                logging.getLogger("memchat").warning("test hook: pausing before commit")
                time.sleep(float(pause))
        st.pending.clear()
        st.new_states.clear()
        st.evicted.clear()
        st.forgotten.clear()


def _scrub(st: SessionState, forgotten: set[int] | None) -> None:
    """After forgetting (the messages ``forgotten``, None: everything), leave no copy of what was
    forgotten outside the memory (which scrubs itself: `SessionMemory.forget_message`): the
    window buffers past the live tokens and the last-read report."""
    cache = st.cache
    for t in (cache.keys, cache.values, cache.keys_rot):
        t[:, :, cache.length :] = 0  # dropping a range leaves its old tail behind
    report = st.last_read
    if report is not None:
        if forgotten is None:
            st.last_read = None
        else:
            report.messages = {m: v for m, v in report.messages.items() if m not in forgotten}
            report.tokens = {k: v for k, v in report.tokens.items() if k[0] not in forgotten}
            report.token_ids = {k: v for k, v in report.token_ids.items() if k[0] not in forgotten}


def _check_roles(messages: Sequence[dict[str, str]]) -> None:
    for m in messages:
        if m.get("role") not in ROLES:
            raise ValueError(f"unknown role {m.get('role')!r}; expected one of {ROLES}")


def _pick(
    logprobs: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    forbid: torch.Tensor | None = None,
) -> int:
    """Greedy at temperature 0, else sample from the tempered distribution cut to its top-p
    nucleus; never one of the token ids ``forbid``."""
    if forbid is not None:
        logprobs = logprobs.index_fill(0, forbid, float("-inf"))
    if temperature <= 0:
        return int(logprobs.argmax())
    probs = torch.softmax(logprobs.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _find_stop(text: str, stop: Sequence[str], sent: int) -> int | None:
    """Where the first stop string starts in ``text`` (searching from just before what was
    already sent), or None."""
    hits = [i for s in stop if s and (i := text.find(s, max(0, sent - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that could begin a stop string: not sent yet."""
    ends = (n for s in stop for n in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:n]))
    return max(ends, default=0)
