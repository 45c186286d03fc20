"""Tests for bench/gen_hard.py, the generator of hard recall-benchmark conversations."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gen_hard.py"


def _load():
    # By path, so the test does not depend on the repository root being on sys.path.
    spec = importlib.util.spec_from_file_location("bench_gen_hard_under_test", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


gh = _load()
SLOT = {s.key: s for s in gh.SLOTS}
ALL_VALUES = [v for s in gh.SLOTS for v in s.values]
N_FACT_MSGS = 2 * (4 + 4)  # default --facts 4 --others 4


def mentions(text: str, value: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(value.lower()) + r"(?!\w)", text.lower()) is not None


def split(case, n_fact_msgs=N_FACT_MSGS):
    """(fact messages, filler pairs, correction index or None, question) of a case."""
    msgs = case["messages"]
    facts, middle, question = msgs[:n_fact_msgs], msgs[n_fact_msgs:-1], msgs[-1]
    pairs = [(middle[k], middle[k + 1]) for k in range(0, len(middle), 2)]
    corr = [k for k, (u, _) in enumerate(pairs) if u["content"].startswith(gh.CORRECTION_PREFIX)]
    assert len(corr) <= 1
    filler = [p for k, p in enumerate(pairs) if k not in corr]
    return facts, filler, (corr[0] if corr else None), question


@pytest.fixture(scope="module", params=[0, 3, 17])
def default_cases(request):
    return gh.generate_with_meta(cases=60, filler=16, seed=request.param)


def test_material_is_consistent():
    assert gh.check_material() == []
    assert len(gh.SLOTS) >= 10
    assert len(gh.FILLER) >= 64  # so that --filler 64 needs no repeats
    assert len(gh.RELATIONS) >= 8


def test_deterministic_by_seed():
    a = gh.generate(cases=20, filler=8, seed=11)
    b = gh.generate(cases=20, filler=8, seed=11)
    c = gh.generate(cases=20, filler=8, seed=12)
    assert a == b
    assert [x["messages"] for x in a] != [x["messages"] for x in c]


def test_cli_writes_the_same_jsonl(tmp_path):
    out = tmp_path / "hard.jsonl"
    assert gh.main(["--cases", "12", "--filler", "5", "--seed", "4", "-o", str(out)]) == 0
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cases", "12", "--filler", "5", "--seed", "4"],
        capture_output=True, text=True, check=True,
    )
    assert proc.stdout == out.read_text()
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert rows == gh.generate(cases=12, filler=5, seed=4)


def test_cli_rejects_bad_options():
    with pytest.raises(SystemExit):
        gh.main(["--facts", str(len(gh.SLOTS) + 1)])
    with pytest.raises(SystemExit):
        gh.main(["--others", str(len(gh.RELATIONS) + 1)])


def test_shape_and_format(default_cases):
    ids = set()
    for i, (case, meta) in enumerate(default_cases):
        assert list(case) == ["id", "kind", "messages", "answer", "candidates", "answer_template"]
        assert case["id"] not in ids
        ids.add(case["id"])
        update = i % 4 == 3
        assert case["kind"] == ("update" if update else "recall")
        msgs = case["messages"]
        assert len(msgs) == N_FACT_MSGS + 2 * 16 + (2 if update else 0) + 1
        assert all(set(m) == {"role", "content"} and m["content"].strip() for m in msgs)
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2) + ["user"]
        facts, filler, corr, question = split(case)
        assert all(m["content"] == gh.ACK for m in facts[1::2])
        assert (corr is not None) == update
        if update:
            assert msgs[N_FACT_MSGS + 2 * corr + 1]["content"] == gh.ACK_UPDATE
        slot = SLOT[meta["slot"]]
        assert question["content"] in slot.questions
        assert case["answer_template"] == slot.answer_template
        assert case["answer_template"].format(v=case["answer"]).count(case["answer"]) == 1
        assert all(isinstance(c, str) for c in case["candidates"])


def test_candidates(default_cases):
    for case, meta in default_cases:
        cands = case["candidates"]
        slot = SLOT[meta["slot"]]
        assert len(cands) == 5 and len(set(cands)) == 5
        assert cands[0] == case["answer"]
        assert all(c in slot.values for c in cands)
        # values seen in the conversation come first: the superseded one, others' values
        seen = ([meta["old"]] if meta["old"] else []) + meta["other_values"] + meta["past_values"]
        seen = [v for v in dict.fromkeys(seen) if v != case["answer"]]
        assert all(v in cands for v in seen[:4])


def test_answer_stated_once_and_filler_is_clean(default_cases):
    for case, meta in default_cases:
        facts, filler, corr, _ = split(case)
        users = [m["content"] for m in facts[::2]]
        answer = case["answer"]
        hits = [u for u in users if mentions(u, answer)]
        if case["kind"] == "recall":
            assert len(hits) == 1
            assert hits[0] in {t.format(v=answer) for t in SLOT[meta["slot"]].user}
        else:
            # the superseded value is stated once as the user's fact; the answer only as
            # another person's value, and only when the correction echoes it
            old = meta["old"]
            assert [u for u in users if mentions(u, old)] == [
                u for u in users if u in {t.format(v=old) for t in SLOT[meta["slot"]].user}
            ]
            assert len([u for u in users if mentions(u, old)]) == 1
            assert len(hits) == (1 if meta["echo"] else 0)
        for q, a in filler:
            text = q["content"] + " " + a["content"]
            assert not any(mentions(text, v) for v in ALL_VALUES), text
        # every fact message holds exactly one slot value, and they are all different
        found = [[v for v in ALL_VALUES if mentions(u, v)] for u in users]
        assert all(len(f) == 1 for f in found), found
        assert len({f[0] for f in found}) == len(found)


def test_update_cases_correct_later(default_cases):
    updates = [(c, m) for c, m in default_cases if c["kind"] == "update"]
    assert len(updates) == 15
    for case, meta in updates:
        msgs = case["messages"]
        _, _, corr, _ = split(case)
        k = N_FACT_MSGS + 2 * corr
        corr_text = msgs[k]["content"]
        assert corr_text.startswith(gh.CORRECTION_PREFIX)
        assert mentions(corr_text, case["answer"]) and not mentions(corr_text, meta["old"])
        first_old = min(j for j, m in enumerate(msgs) if mentions(m["content"], meta["old"]))
        assert first_old < N_FACT_MSGS < k
        assert not any(mentions(m["content"], meta["old"]) for m in msgs[k:])
        assert meta["old"] in case["candidates"][1:]
        assert 0.2 * 16 <= corr <= 0.8 * 16  # in the middle of the filler


def test_echo_distractor_is_rare_but_present():
    cases = gh.generate_with_meta(cases=400, filler=0, seed=5)
    updates = [m for c, m in cases if c["kind"] == "update"]
    echoes = [m for m in updates if m["echo"]]
    assert 0 < len(echoes) < 0.35 * len(updates)
    none = gh.generate_with_meta(cases=40, filler=0, seed=5, echo_rate=0.0)
    assert not any(m["echo"] for _, m in none)


def test_filler_64_is_four_times_filler_16():
    short = gh.generate(cases=12, filler=16, seed=9)
    long = gh.generate(cases=12, filler=64, seed=9)
    for s, lo in zip(short, long, strict=True):
        # same case, only the filler differs
        assert s["messages"][:N_FACT_MSGS] == lo["messages"][:N_FACT_MSGS]
        for key in ("kind", "answer", "candidates", "answer_template"):
            assert s[key] == lo[key]
        assert s["messages"][-1] == lo["messages"][-1]
        _, fs, _, _ = split(s)
        _, fl, _, _ = split(lo)
        assert (len(fs), len(fl)) == (16, 64)
        chars = [sum(len(q["content"]) + len(a["content"]) for q, a in f) for f in (fs, fl)]
        assert 3.0 < chars[1] / chars[0] < 5.0
        questions = [q["content"] for q, _ in fl]
        assert len(set(questions)) == 64  # the pool is large enough: no repeats
    mid = gh.generate(cases=12, filler=32, seed=9)
    assert all(len(split(c)[1]) == 32 for c in mid)


def test_filler_repeats_only_after_the_pool_is_used_up():
    n = len(gh.FILLER)
    case = gh.generate(cases=1, filler=2 * n + 5, seed=2, update_every=0)[0]
    _, filler, _, _ = split(case)
    questions = [q["content"] for q, _ in filler]
    assert len(set(questions[:n])) == n
    assert len(set(questions[n : 2 * n])) == n
    assert all(a != b for a, b in zip(questions, questions[1:], strict=False))


def test_other_counts_of_facts_and_others():
    cases = gh.generate_with_meta(cases=16, filler=3, seed=1, facts=6, others=2, update_every=2)
    for case, _ in cases:
        n_fact_msgs = 2 * (6 + 2)
        update = case["kind"] == "update"
        assert len(case["messages"]) == n_fact_msgs + 2 * 3 + (2 if update else 0) + 1
        facts, filler, corr, _ = split(case, n_fact_msgs)
        assert all(m["content"] == gh.ACK for m in facts[1::2])
        assert len(filler) == 3 and (corr is not None) == update
    assert sum(c["kind"] == "update" for c, _ in cases) == 8


def test_other_people_facts_read_naturally():
    brother = SLOT["brother"]
    for case in gh.generate(cases=120, filler=0, seed=8):
        for m in case["messages"][:N_FACT_MSGS:2]:
            for rel in gh.FAMILY:
                # no "My aunt has a brother called ..."
                assert not any(m["content"] == t.format(rel=rel, v=v) for t in brother.other
                               for v in brother.values)
