"""The OpenAI-compatible endpoint through the official ``openai`` client, against a real uvicorn
server (the app in a background thread on a free port), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from app.config import Settings
from app.main import create_app
from app.model import LoadedModel
from app.serving import serve_in_thread
from tests.api.support import filler

SYSTEM = "You are a friendly assistant. Answer in one short sentence."
CAT_FACT = "My cat is called Pumpkin."


@contextmanager
def running_server(settings: Settings, lm: LoadedModel) -> Iterator[str]:
    """The app served by uvicorn in a background thread; yields its base URL once /readyz is
    200 (the model is given, so at once)."""
    with serve_in_thread(create_app(settings, lm=lm)) as base:
        assert httpx.get(f"{base}/readyz", timeout=5).status_code == 200
        yield base


def _settings(url: str) -> Settings:
    return Settings(
        _env_file=None,
        database_url=url,
        window=128,
        max_new_tokens=12,
        json_logs=False,
        log_level="WARNING",
    )


@pytest.fixture()
def server(lm: LoadedModel, db_url: str) -> Iterator[str]:
    """Base URL of a real server on SQLite or PostgreSQL."""
    with running_server(_settings(db_url), lm) as base:
        yield base


@pytest.fixture()
def sqlite_server(lm: LoadedModel, sqlite_url: str) -> Iterator[str]:
    """Base URL of a real server on an SQLite file."""
    with running_server(_settings(sqlite_url), lm) as base:
        yield base


@contextmanager
def oai(base: str) -> Iterator[openai.OpenAI]:
    """The official client pointed at the server (no retries: a failure shows at once)."""
    with openai.OpenAI(
        base_url=f"{base}/v1", api_key="not-checked", max_retries=0, timeout=120
    ) as client:
        yield client


def sessions_total(base: str) -> int:
    total: int = httpx.get(f"{base}/v1/sessions").json()["total"]
    return total


def transcript(base: str, sid: str) -> list[tuple[str, str]]:
    r = httpx.get(f"{base}/v1/sessions/{sid}/messages", params={"limit": 200})
    assert r.status_code == 200, r.text
    return [(m["role"], m["content"]) for m in r.json()["data"]]


# ----- plain completions ------------------------------------------------------------------------
def test_completion_and_models(server: str, lm: LoadedModel) -> None:
    with oai(server) as client:
        models = client.models.list()
        assert [m.id for m in models.data] == [lm.name]
        assert models.data[0].object == "model"

        out = client.chat.completions.create(
            model=lm.name,
            messages=[
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": "What is the capital of France?"},
            ],
            max_tokens=8,
        )
    assert isinstance(out, ChatCompletion)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.model == lm.name
    assert len(out.choices) == 1
    choice = out.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    u = out.usage
    assert u is not None and u.prompt_tokens > 0 and 0 < u.completion_tokens <= 8
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    if choice.finish_reason == "length":
        assert u.completion_tokens == 8
    # a stateless request leaves nothing behind
    assert sessions_total(server) == 0


def test_min_tokens(sqlite_server: str, lm: LoadedModel) -> None:
    messages: list[Any] = [{"role": "user", "content": "Say hello."}]
    with oai(sqlite_server) as client:
        short = client.chat.completions.create(model=lm.name, messages=messages, max_tokens=60)
        assert short.usage is not None
        n = short.usage.completion_tokens  # the model ends this reply by itself, before the cap
        assert short.choices[0].finish_reason == "stop" and n <= 40
        held = client.chat.completions.create(
            model=lm.name, messages=messages, max_tokens=60, extra_body={"min_tokens": n + 10}
        )
    assert held.usage is not None and held.usage.completion_tokens >= n + 10


# ----- streaming --------------------------------------------------------------------------------
def test_streamed_chunks_match_the_whole_reply(sqlite_server: str, lm: LoadedModel) -> None:
    messages: list[Any] = [{"role": "user", "content": "Name three colours of the rainbow."}]
    with oai(sqlite_server) as client:
        whole = client.chat.completions.create(model=lm.name, messages=messages, max_tokens=10)
        stream = client.chat.completions.create(
            model=lm.name,
            messages=messages,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)

    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert {c.model for c in chunks} == {lm.name}

    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text.strip()
    finishing = [i for i, c in enumerate(with_choices) if c.choices[0].finish_reason is not None]
    assert finishing == [len(with_choices) - 1]
    finish = with_choices[-1].choices[0].finish_reason
    assert finish in ("stop", "length")

    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert [c for c in chunks[:-1] if c.usage is not None] == []
    u = last.usage
    assert u.completion_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens

    # greedy and stateless: the stream carries the same reply as the whole answer
    assert text == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert whole.usage is not None and u.model_dump() == whole.usage.model_dump()
    assert sessions_total(sqlite_server) == 0


def test_stream_wire_format(sqlite_server: str) -> None:
    body = {
        "model": "memchat",
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 6,
        "stream": True,
    }
    with httpx.stream("POST", f"{sqlite_server}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = list(r.iter_lines())

    payload = [line for line in lines if line and not line.startswith(":")]  # ":" = ping
    assert payload and all(line.startswith("data: ") for line in payload), payload
    assert payload[-1] == "data: [DONE]"
    assert sum(line == "data: [DONE]" for line in payload) == 1
    chunks = [json.loads(line[len("data: ") :]) for line in payload[:-1]]
    assert all(isinstance(c, dict) and c["object"] == "chat.completion.chunk" for c in chunks)
    # without include_usage no chunk carries usage, and a delta holds only what it sets
    assert [c for c in chunks if c.get("usage") is not None] == []
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    middle = [c["choices"][0] for c in chunks[1:-1]]
    assert middle and all(set(ch["delta"]) == {"content"} for ch in middle)
    assert all(ch["finish_reason"] is None for ch in middle)


# ----- sessions ---------------------------------------------------------------------------------
def test_session_by_header_continues(server: str, lm: LoadedModel) -> None:
    assert sessions_total(server) == 0
    history: list[Any] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": CAT_FACT},
        {"role": "assistant", "content": "What a lovely name for a cat!"},
        *filler(3),
        {"role": "user", "content": "What is my cat called?"},
    ]
    with oai(server) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=lm.name,
            messages=history,
            max_tokens=8,
            extra_headers={"X-Session-Id": "alice"},
        )
        first = raw.parse()
        sid = raw.headers["X-Session-Id"]
        assert first.choices[0].message.content

        listing = httpx.get(f"{server}/v1/sessions").json()
        assert listing["total"] == 1
        row = listing["data"][0]
        assert row["id"] == sid and row["title"] == "alice"
        assert row["system_prompt"] == SYSTEM
        before = transcript(server, sid)
        assert before[0][0] == "system"  # the pinned system block (the prompt is on the row)
        assert before[1:] == [(m["role"], m["content"]) for m in history[1:]] + [
            ("assistant", first.choices[0].message.content)
        ]

        # only the new message: the session holds the rest
        question = "And what colour is she?"
        raw2 = client.chat.completions.with_raw_response.create(
            model=lm.name,
            messages=[{"role": "user", "content": question}],
            max_tokens=6,
            extra_headers={"X-Session-Id": "alice"},
        )
        second = raw2.parse()
        assert raw2.headers["X-Session-Id"] == sid
        after = transcript(server, sid)
        assert after == before + [
            ("user", question),
            ("assistant", second.choices[0].message.content),
        ]

        # a client that resends the whole conversation (the usual OpenAI way) adds only its last
        # message: nothing is imported twice
        resent = [
            *history,
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": question},
            {"role": "assistant", "content": second.choices[0].message.content},
            {"role": "user", "content": "Thanks!"},
        ]
        third = client.chat.completions.create(
            model=lm.name,
            messages=resent,
            max_tokens=4,
            extra_headers={"X-Session-Id": "alice"},
        )
        assert transcript(server, sid) == after + [
            ("user", "Thanks!"),
            ("assistant", third.choices[0].message.content),
        ]
        assert sessions_total(server) == 1

        # the session id works as the name too
        client.chat.completions.create(
            model=lm.name,
            messages=[{"role": "user", "content": "Bye."}],
            max_tokens=2,
            extra_headers={"X-Session-Id": sid},
        )
        assert len(transcript(server, sid)) == len(after) + 4 and sessions_total(server) == 1


def test_session_by_user_field_and_stateless(sqlite_server: str, lm: LoadedModel) -> None:
    base = sqlite_server
    with oai(base) as client:
        # stateless, whole and streamed: no session is left behind
        convo: list[Any] = [
            {"role": "user", "content": CAT_FACT},
            {"role": "assistant", "content": "Nice!"},
            {"role": "user", "content": "What is my cat called?"},
        ]
        whole = client.chat.completions.create(model=lm.name, messages=convo, max_tokens=4)
        assert whole.choices[0].message.content
        assert sessions_total(base) == 0
        stream = client.chat.completions.create(
            model=lm.name, messages=convo, max_tokens=4, stream=True
        )
        assert list(stream)  # drained: the throwaway session goes at the stream's end
        assert sessions_total(base) == 0

        raw = client.chat.completions.with_raw_response.create(
            model=lm.name,
            messages=[
                {"role": "user", "content": CAT_FACT},
                {"role": "assistant", "content": "Nice!"},
                {"role": "user", "content": "What is my cat called?"},
            ],
            max_tokens=6,
            user="bob",
        )
        sid = raw.headers["X-Session-Id"]
        listing = httpx.get(f"{base}/v1/sessions").json()
        assert listing["total"] == 1 and listing["data"][0]["title"] == "bob"
        assert listing["data"][0]["id"] == sid
        before = transcript(base, sid)
        assert [m for _, m in before[1:4]] == [CAT_FACT, "Nice!", "What is my cat called?"]

        raw2 = client.chat.completions.with_raw_response.create(
            model=lm.name,
            messages=[{"role": "user", "content": "Is that a good name?"}],
            max_tokens=4,
            user="bob",
            stream=True,
        )
        assert raw2.headers["X-Session-Id"] == sid
        text = "".join(c.choices[0].delta.content or "" for c in raw2.parse() if c.choices)
        assert transcript(base, sid) == before + [
            ("user", "Is that a good name?"),
            ("assistant", text),
        ]
        assert sessions_total(base) == 1


# ----- errors -----------------------------------------------------------------------------------
def test_errors(sqlite_server: str, lm: LoadedModel) -> None:
    base = sqlite_server
    with oai(base) as client:
        with pytest.raises(openai.UnprocessableEntityError) as e:
            client.chat.completions.create(
                model=lm.name, messages=[{"role": "user", "content": "Hi"}], n=2
            )
        assert e.value.status_code == 422
        assert e.value.response.json()["error"]["param"] == "n"
        assert e.value.param == "n" and e.value.code == "unsupported"

        with pytest.raises(openai.UnprocessableEntityError) as e:
            client.chat.completions.create(
                model=lm.name,
                messages=[
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                ],
                extra_headers={"X-Session-Id": "carol"},
            )
        assert e.value.response.json()["error"]["param"] == "messages"

        with pytest.raises(openai.UnprocessableEntityError) as e:  # schema validation
            client.chat.completions.create(
                model=lm.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=0
            )
        assert e.value.response.json()["error"]["param"] == "max_tokens"

        with pytest.raises(openai.UnprocessableEntityError) as e:  # vLLM's extra parameter
            client.chat.completions.create(
                model=lm.name,
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=4,
                extra_body={"min_tokens": 5},
            )
        assert e.value.response.json()["error"]["param"] == "min_tokens"

        with pytest.raises(openai.UnprocessableEntityError) as e:  # also when streaming
            client.chat.completions.create(
                model=lm.name,
                messages=[{"role": "user", "content": "Hi"}],
                stream=True,
                n=3,
            )
        assert e.value.response.json()["error"]["param"] == "n"
        # a new named session whose first turn the engine refuses (too long for the 128-token
        # window) is not left behind
        with pytest.raises(openai.UnprocessableEntityError) as bad:
            client.chat.completions.create(
                model=lm.name,
                messages=[{"role": "user", "content": "tell me more " * 80}],
                extra_headers={"X-Session-Id": "dave"},
            )
        assert bad.value.response.json()["error"]["code"] == "window_too_small"
    # a refused request creates nothing
    assert sessions_total(base) == 0

    r = httpx.post(f"{base}/v1/sessions/no-such-session/chat", json={"message": "Hi"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "session_not_found"
    r = httpx.get(f"{base}/v1/sessions/no-such-session/messages")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_stateless_stream_cut_short_leaves_no_session(sqlite_server: str) -> None:
    before = sessions_total(sqlite_server)
    body = {
        "model": "memchat",
        "messages": [{"role": "user", "content": "Write a long poem about the sea."}],
        "stream": True,
        "max_tokens": 200,
    }
    with httpx.stream(
        "POST", f"{sqlite_server}/v1/chat/completions", json=body, timeout=120
    ) as r:  # the first piece can take a while on a loaded CPU (httpx waits 5 s by default)
        assert r.status_code == 200 and "x-session-id" not in r.headers
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                break  # the client goes away mid-reply
    for _ in range(300):
        if sessions_total(sqlite_server) == before:
            break
        time.sleep(0.1)
    assert sessions_total(sqlite_server) == before
