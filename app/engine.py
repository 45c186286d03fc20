"""The chat engine: one session's working window and memory, one turn end to end.

A turn: the user's message is encoded and run after the window (reading memory in every layer);
the reply is generated token by token; messages that no longer fit in the window move to memory
(their keys/values as computed when they were processed); strengths decay, entries are reinforced
by the attention they got and evicted under the budget; then messages, window states and memory
changes are committed in one transaction. If anything fails before the commit, the session's
cached state is dropped and reloaded from the database: it is as it was after its last whole turn.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import faiss
import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import sessionmaker

from app.chat_format import ChatFormat, EncodedMessage
from app.memory_llama import ForwardOutput, ReadConfig, WindowCache, forward
from app.model import LoadedModel
from memory_store import MemoryParams, SessionMemory
from memory_store.errors import SessionNotFound
from memory_store.models import ChatSession, Message
from memory_store.persistence import (
    delete_message_state,
    load_memory,
    load_message_states,
    save_memory,
    save_message_state,
)

ROLES = ("system", "user", "assistant")


class WindowTooSmall(ValueError):
    """A message does not fit in the session's working window even after evicting the rest."""


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
    mass: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    last_read: dict[int, float] = field(default_factory=dict)  # message seq -> attention mass
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class TurnStats:
    """Figures of the last turn, for usage reports and benchmarks."""

    prompt_tokens: int
    completion_tokens: int
    memory_entries: int
    memory_tokens: int
    read_seconds: float
    write_seconds: float
    seconds: float
    finish_reason: str


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
    ) -> None:
        self.lm = lm
        self.model = lm.model
        self.fmt = ChatFormat(lm.tokenizer)
        self.db = db
        self.window = window
        self.params = params or MemoryParams()
        self.read = read or ReadConfig()
        self.max_new_tokens = max_new_tokens
        self.max_cached_sessions = max_cached_sessions
        self.knn_roles = knn_roles  # whose tokens the output-level read may copy
        self._cache: OrderedDict[str, SessionState] = OrderedDict()
        self._cache_lock = threading.Lock()
        cfg = self.model.config
        self.n_layers = cfg.num_hidden_layers
        self.n_kv = int(cfg.num_key_value_heads or cfg.num_attention_heads)
        self.head_dim = int(
            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        )
        self.hidden_dim = cfg.hidden_size
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 8192))
        self.last_stats: TurnStats | None = None
        # The read searches a few queries at a time: FAISS's thread pool costs more than it saves
        # (7x slower per search on 2 busy cores, measured).
        faiss.omp_set_num_threads(1)

    # ----- sessions -------------------------------------------------------------------------
    def create_session(
        self,
        name: str | None = None,
        title: str | None = None,
        options: SessionOptions | None = None,
    ) -> str:
        """Create a session row (and its pinned system block) and return its id."""
        opts = options or SessionOptions()
        window = opts.window or self.window
        if window > self.max_positions:
            raise WindowTooSmall(
                f"window {window} exceeds the model's {self.max_positions} positions"
            )
        params = opts.params or self.params
        read = opts.read or self.read
        sid = uuid.uuid4().hex
        with self.db.begin() as db:
            db.add(
                ChatSession(
                    id=sid,
                    name=name,
                    title=title,
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
            )
        state = self._new_state(
            sid, window, opts.memory_enabled, replace(read, collect_mass=True), params
        )
        system = self.fmt.system_block(opts.system_prompt)
        with state.lock:
            if len(system.token_ids):
                self._process(state, system, pinned=True, content="")
            self._commit(state)
        self._remember(state)
        return sid

    def find_session(self, name: str) -> str | None:
        """Id of the session with this name, if any."""
        with self.db() as db:
            return db.scalar(select(ChatSession.id).where(ChatSession.name == name))

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
        cache = WindowCache(self.model, window, round_fp16=True)
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
        while st.cache.length + n > st.window_size:
            victim = next((e for e in st.entries if not e.pinned), None)
            if victim is None:
                raise WindowTooSmall(
                    f"{n} tokens do not fit in a window of {st.window_size} tokens "
                    f"({st.cache.length} pinned); shorten the message or enlarge the window"
                )
            self._evict(st, victim)

    def _evict(self, st: SessionState, entry: WindowEntry) -> None:
        start, end = entry.start, entry.end
        if st.memory_enabled:
            mask = entry.content_mask
            if mask.any():
                keys = st.cache.keys[:, :, start:end][:, :, mask].float().numpy()  # (L, H, t, D)
                values = st.cache.values[:, :, start:end][:, :, mask].float().numpy()
                positions = np.nonzero(mask)[0].astype(np.int32)
                token_ids = entry.token_ids[mask]
                seqs = np.full(len(token_ids), entry.seq, dtype=np.int64)
                st.memory.write(keys, values, token_ids, seqs, positions)
                # output-level read: each token's final state predicts the token after it; a
                # token followed by a special one (end of message) would teach replies to stop
                nxt_all = np.append(entry.token_ids[1:], entry.token_ids[-1])
                kmask = mask & ~np.isin(nxt_all, list(self.fmt.special_ids))
                if kmask.any() and entry.role in self.knn_roles:
                    hidden = entry.hidden[torch.from_numpy(kmask)].float().numpy()
                    st.memory.write_knn(
                        hidden,
                        nxt_all[kmask],
                        entry.token_ids[kmask],
                        np.full(int(kmask.sum()), entry.seq, dtype=np.int64),
                        np.nonzero(kmask)[0].astype(np.int32),
                    )
        st.cache.drop_range(start, end)
        idx = st.entries.index(entry)
        st.entries.pop(idx)
        for e in st.entries[idx:]:
            e.start -= end - start
        st.evicted.append(entry.seq)

    def _run(
        self, st: SessionState, ids: np.ndarray, commit: bool = True, logits_from: int | None = -1
    ) -> ForwardOutput:
        """One forward pass after the window (log-probabilities from ``logits_from`` on; the last
        token's by default), accumulating the memory mass for reinforcement."""
        memory = st.memory if st.memory_enabled else None
        out = forward(
            self.model,
            torch.from_numpy(ids),
            st.cache,
            memory,
            st.read,
            commit=commit,
            logits_from=logits_from,
        )
        if out.memory_mass:
            for layer, lm in enumerate(out.memory_mass):
                for head in range(len(lm.ids)):
                    st.mass.setdefault((layer, head), []).append((lm.ids[head], lm.mass[head]))
        return out

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
        ids = np.concatenate([enc.token_ids for enc, _, _ in batch])
        if not pinned:
            self._make_room(st, len(ids))
        start = st.cache.length
        out = self._run(st, ids, logits_from=None)
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
        return seqs

    # ----- turns ----------------------------------------------------------------------------
    def import_messages(self, session_id: str, messages: Sequence[dict[str, str]]) -> list[int]:
        """Append history without generating: the messages run through the model (a few at a
        time, at most a quarter of the window per pass, so each still sees older context in the
        window), and what overflows the window goes to memory as in a live chat. One transaction
        for the whole import."""
        for m in messages:
            if m.get("role") not in ROLES:
                raise ValueError(f"unknown role {m.get('role')!r}; expected one of {ROLES}")
        st = self.state(session_id)
        with st.lock, self._turn_guard(st):
            seqs: list[int] = []
            batch: list[tuple[EncodedMessage, str, int]] = []
            budget = max(1, st.window_size // 4)
            for m in messages:
                enc = self.fmt.encode(m["role"], m["content"])
                if (
                    batch
                    and sum(len(e.token_ids) for e, _, _ in batch) + len(enc.token_ids) > budget
                ):
                    seqs += self._process_many(st, batch)
                    batch = []
                if m["role"] == "user":
                    self._begin_turn(st)
                batch.append((enc, m["content"], st.turn))
            if batch:
                seqs += self._process_many(st, batch)
            self._end_turn(st)
            self._commit(st)
            return seqs

    def chat(
        self,
        session_id: str,
        text: str,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> Iterator[str]:
        """One turn: yields the reply's text as it is generated; the turn is committed when the
        generator finishes (a generator closed early commits what was generated)."""
        st = self.state(session_id)
        limit = max_new_tokens or self.max_new_tokens
        t0 = time.perf_counter()
        with st.lock, self._turn_guard(st):
            read_s = 0.0
            self._begin_turn(st)
            user = self.fmt.encode("user", text)
            header = self.fmt.generation_header()
            reserve = min(limit, st.window_size // 4)
            self._make_room(st, len(user.token_ids) + len(header) + reserve)
            self._process(st, user, content=text)
            prompt_tokens = len(user.token_ids) + len(header)
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            out = self._run(st, header)
            read_s += out.read_seconds
            generated: list[int] = []
            hiddens = [out.hidden]
            sent = ""
            finish = "length"
            close = self.fmt.close_reply()
            try:
                for _ in range(limit):
                    nxt = _pick(out.logits[-1], temperature, generator)
                    if nxt in self.fmt.stop_ids:
                        finish = "stop"
                        break
                    generated.append(nxt)
                    text_now = str(self.lm.tokenizer.decode(generated, skip_special_tokens=True))
                    if not text_now.endswith("\ufffd") and len(text_now) > len(sent):
                        yield text_now[len(sent) :]
                        sent = text_now
                    if st.cache.length + 1 + len(close) > st.window_size:
                        # the reply goes on: older messages move to memory (the reply stays)
                        self._make_room(st, 1 + len(close))
                    out = self._run(st, np.asarray([nxt], dtype=np.int64))
                    read_s += out.read_seconds
                    hiddens.append(out.hidden)
            except GeneratorExit:
                finish = "cancelled"  # the client stopped reading: keep what was generated
            out = self._run(st, close, logits_from=None)
            hiddens.append(out.hidden)
            reply_text = str(self.lm.tokenizer.decode(generated, skip_special_tokens=True))
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
            self._end_turn(st)
            self._commit(st)
            self.last_stats = TurnStats(
                prompt_tokens=prompt_tokens,
                completion_tokens=len(generated),
                memory_entries=st.memory.entry_count(),
                memory_tokens=st.memory.token_count(),
                read_seconds=read_s,
                write_seconds=time.perf_counter() - tw,
                seconds=time.perf_counter() - t0,
                finish_reason=finish,
            )

    def score_replies(self, session_id: str, question: str, replies: Sequence[str]) -> list[float]:
        """Total log-probability of each reply's content tokens after ``question``, as a live turn
        would see it. Nothing is committed: the RAM state is dropped afterwards."""
        st = self.state(session_id)
        try:
            with st.lock:
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
        st.memory.set_turn(st.turn)

    def _end_turn(self, st: SessionState) -> None:
        """Reinforce what was read, note which messages it came from, evict under the budget."""
        st.last_read = {}
        for (layer, head), parts in st.mass.items():
            ids = np.concatenate([p[0] for p in parts])
            mass = np.concatenate([p[1] for p in parts])
            uniq, inv = np.unique(ids, return_inverse=True)
            summed = np.bincount(inv, weights=mass).astype(np.float32)
            # entries may have been evicted since they were read; reinforce only live ones
            st.memory.reinforce(layer, head, uniq, summed)
            msg_ids, _, _ = st.memory.entry_info(layer, head, uniq)
            for m, w in zip(msg_ids.tolist(), summed.tolist(), strict=True):
                if m >= 0:
                    st.last_read[m] = st.last_read.get(m, 0.0) + w
        st.mass.clear()
        st.memory.evict()

    class _Guard:
        def __init__(self, engine: Engine, st: SessionState) -> None:
            self.engine, self.st = engine, st

        def __enter__(self) -> None:
            self.st.pending.clear()
            self.st.new_states.clear()
            self.st.evicted.clear()
            self.st.mass.clear()

        def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
            if exc_type is not None:
                # the RAM state is half a turn ahead of SQL: drop it, the next use reloads
                self.engine.drop_cached(self.st.session_id)

    def _turn_guard(self, st: SessionState) -> Engine._Guard:
        return Engine._Guard(self, st)

    def _commit(self, st: SessionState) -> None:
        """Write the turn: new messages, window states, evictions, memory changes, in one
        transaction."""
        with self.db.begin() as db:
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
            save_memory(db, st.session_id, st.memory)
        st.pending.clear()
        st.new_states.clear()
        st.evicted.clear()


def _pick(logprobs: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0, else sample from the tempered distribution."""
    if temperature <= 0:
        return int(logprobs.argmax())
    probs = torch.softmax(logprobs.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
