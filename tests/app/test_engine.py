"""The chat engine with the real model: recall through memory, persistence, one transaction."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select

from app.engine import Engine, SessionOptions
from memory_store.models import Message

FILLER = [
    ("What causes rainbows?", "Sunlight is bent and split into colours by raindrops."),
    ("How do I boil pasta?", "Bring salted water to a boil, add the pasta and stir now and then."),
    ("Why do leaves change colour?", "Chlorophyll breaks down in autumn and other pigments show."),
    ("What is a good warm-up?", "Light jogging and a few dynamic stretches for five minutes."),
    ("How far is the Moon?", "About 384,000 kilometres from the Earth on average."),
    ("How do I clean a cast iron pan?", "Rinse it with hot water, dry it well and oil it lightly."),
]
FACT = "Hi! I have a cat called Pumpkin."
QUESTION = "What is my cat called?"
CANDIDATES = ["Pumpkin", "Oliver", "Shadow", "Mittens", "Felix"]


def _history() -> list[dict[str, str]]:
    msgs = [
        {"role": "user", "content": FACT},
        {"role": "assistant", "content": "Nice! How can I help?"},
    ]
    for q, a in FILLER:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def _scores(engine: Engine, sid: str) -> list[float]:
    return engine.score_replies(sid, QUESTION, [f"Your cat is called {c}." for c in CANDIDATES])


def test_fact_outside_window_is_recalled_through_memory(engine_factory, sqlite_db: str) -> None:
    engine = engine_factory(sqlite_db, window=128)
    with_mem = engine.create_session(options=SessionOptions(memory_enabled=True))
    without = engine.create_session(options=SessionOptions(memory_enabled=False))
    for sid in (with_mem, without):
        engine.import_messages(sid, _history())
    with engine.db() as db:
        fact = db.scalar(select(Message).where(Message.session_id == with_mem, Message.seq == 1))
        assert fact is not None and fact.content == FACT and fact.location == "memory"
    assert engine.state(with_mem).memory.token_count() > 0
    s_mem, s_none = _scores(engine, with_mem), _scores(engine, without)
    assert int(np.argmax(s_mem)) == 0, s_mem
    assert int(np.argmax(s_none)) != 0, s_none


def test_special_tokens_never_enter_memory(engine_factory, sqlite_db: str) -> None:
    engine = engine_factory(sqlite_db, window=96)
    sid = engine.create_session()
    engine.import_messages(sid, _history()[:6])
    mem = engine.state(sid).memory
    special = set(engine.lm.tokenizer.all_special_ids)
    assert mem.token_count() > 0
    for layer in (0, 29):
        for head in range(3):
            n = mem.slot_size(layer, head)
            _, token_ids, _ = mem.entry_info(layer, head, np.arange(n, dtype=np.int64))
            assert not special & set(token_ids.tolist())


def _roundtrip(engine_factory, url: str) -> None:
    first = engine_factory(url, window=128)
    sid = first.create_session()
    first.import_messages(sid, _history())
    reply = "".join(first.chat(sid, "Thanks! Any tip for a rainy day?", max_new_tokens=12))
    assert reply.strip()
    before = _scores(first, sid)  # a dry run: drops its RAM state afterwards
    # a new engine over the same database is a restart: everything comes from SQL
    second = engine_factory(url, window=128)
    st = second.state(sid)
    assert st.turn == first.state(sid).turn
    after = _scores(second, sid)
    assert before == after


def test_restart_reads_equal_sqlite(engine_factory, sqlite_db: str) -> None:
    _roundtrip(engine_factory, sqlite_db)


def test_restart_reads_equal_postgres(engine_factory, pg_url: str) -> None:
    _roundtrip(engine_factory, pg_url)


def test_failed_turn_leaves_session_as_it_was(engine_factory, sqlite_db: str, monkeypatch) -> None:
    engine = engine_factory(sqlite_db, window=128)
    sid = engine.create_session()
    engine.import_messages(sid, _history())
    before = _scores(engine, sid)
    with engine.db() as db:
        n_messages = len(db.scalars(select(Message).where(Message.session_id == sid)).all())
    turn = engine.state(sid).turn
    tokens = engine.state(sid).memory.token_count()

    import app.engine as engine_mod

    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("disk on fire")

    # fail inside the commit, after the messages were added and the memory changed in RAM
    monkeypatch.setattr(engine_mod, "save_memory", boom)
    with pytest.raises(RuntimeError):
        "".join(
            engine.chat(sid, "Tell me about volcanoes in one long paragraph.", max_new_tokens=40)
        )
    monkeypatch.undo()

    with engine.db() as db:
        assert len(db.scalars(select(Message).where(Message.session_id == sid)).all()) == n_messages
    st = engine.state(sid)
    assert st.turn == turn and st.memory.token_count() == tokens
    assert _scores(engine, sid) == before


def test_chat_streams_and_persists_the_turn(engine_factory, sqlite_db: str) -> None:
    engine = engine_factory(sqlite_db, window=256)
    sid = engine.create_session()
    turn = engine.chat(sid, "Say hello in French.", max_new_tokens=16)
    pieces = list(turn)
    assert len(pieces) >= 2 and "".join(pieces).strip()
    stats = turn.stats
    assert stats is not None and stats.completion_tokens > 0
    with engine.db() as db:
        rows = db.scalars(
            select(Message).where(Message.session_id == sid).order_by(Message.seq)
        ).all()
    assert [r.role for r in rows][-2:] == ["user", "assistant"]
    assert rows[-1].content == "".join(pieces)


def test_read_report_sums_mass_per_message_token_and_band() -> None:
    """`Engine._report` (vectorised) equals a plain per-entry sum: mass per (message, position)
    and per message, in the layer band of each slot; entries no longer in memory are skipped."""
    from types import SimpleNamespace

    from app.engine import BANDS
    from memory_store import SessionMemory

    rng = np.random.default_rng(0)
    L, H, D = 6, 2, 8
    mem = SessionMemory(L, H, D, 16)
    for seq in range(4):
        T = 5
        mem.write(
            rng.standard_normal((L, H, T, D)).astype(np.float32),
            rng.standard_normal((L, H, T, D)).astype(np.float32),
            rng.integers(0, 100, T),
            np.full(T, seq),
            np.arange(T),
        )
    raw = {}
    for layer in range(L):
        for head in range(H):
            ids = rng.integers(0, 24, 30)  # ids 20..23 were never written: skipped
            raw[(layer, head)] = (ids, rng.random(30))
    read = {key: mem.tally_reads(*key, ids, w) for key, (ids, w) in raw.items()}
    fake = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(num_attention_heads=6)))
    fake.n_layers = L
    report = Engine._report(fake, read, 7)  # type: ignore[arg-type]

    tokens: dict[tuple[int, int], np.ndarray] = {}
    for (layer, head), (ids, w) in raw.items():
        band = min(len(BANDS) - 1, layer * len(BANDS) // L)
        msg, tok, pos = mem.entry_info(layer, head, ids)
        for m, t, p, x in zip(msg, tok, pos, w, strict=True):
            if m >= 0:
                tokens.setdefault((int(m), int(p)), np.zeros(len(BANDS)))[band] += x
                assert report.token_ids[(int(m), int(p))] == t
    assert set(report.tokens) == set(tokens)
    for key, want in tokens.items():
        np.testing.assert_allclose(report.tokens[key], want)
    for seq in range(4):
        want = sum((v for (m, _), v in tokens.items() if m == seq), np.zeros(len(BANDS)))
        np.testing.assert_allclose(report.messages[seq], want)
    assert report.queries == 7 and report.layers == L and report.heads == 6


def test_concurrent_turns_share_decoding_steps(engine_factory, sqlite_db: str) -> None:
    """Three sessions chatting at once decode in shared forward passes (batches of 2 and 3 were
    run) and say what each would have said alone; memory reads and commits stay per session."""
    import threading

    questions = ["Name a fruit.", "What is my cat called?", "Say hi in Spanish."]
    alone = engine_factory(sqlite_db, window=128, decode_batch=1)
    together = engine_factory(sqlite_db, window=128, decode_batch=4)
    sids = {e: [] for e in (alone, together)}
    for e in (alone, together):
        for _ in questions:
            sid = e.create_session()
            e.import_messages(sid, _history())  # the cat fact goes to memory
            sids[e].append(sid)
    solo = [
        "".join(alone.chat(s, q, max_new_tokens=10))
        for s, q in zip(sids[alone], questions, strict=True)
    ]
    assert set(alone.batcher.batch_sizes) == {1}
    replies: dict[int, str] = {}
    start = threading.Barrier(len(questions))

    def run(i: int) -> None:
        start.wait()
        replies[i] = "".join(together.chat(sids[together][i], questions[i], max_new_tokens=10))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [replies[i] for i in range(len(questions))] == solo
    assert max(together.batcher.batch_sizes) >= 2, together.batcher.batch_sizes
    for e in (alone, together):  # each session committed its own turn
        for sid in sids[e]:
            assert e.state(sid).turn == alone.state(sids[alone][0]).turn
