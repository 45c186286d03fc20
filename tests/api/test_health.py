"""Liveness, readiness and metrics."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.api.support import ClientFactory


def test_live_ready_metrics(make_client: ClientFactory, db_url: str) -> None:
    with make_client(db_url) as client:
        assert client.get("/livez").json() == {"status": "alive"}
        r = client.get("/readyz")
        assert r.status_code == 200 and r.json()["checks"] == {"model": "ok", "database": "ok"}
        sid = client.post("/v1/sessions", json={}).json()["id"]
        r = client.post(f"/v1/sessions/{sid}/chat", json={"message": "Hi", "max_tokens": 3})
        assert r.status_code == 200
        assert r.headers["x-request-id"]
        text = client.get("/metrics").text
        assert 'memchat_turns_total{kind="chat"} 1.0' in text
        assert (
            'memchat_http_requests_total{method="POST",route="/v1/sessions/{session_id}/chat",'
            'status="200"} 1.0'
        ) in text
        tokens = next(
            line for line in text.splitlines() if line.startswith("memchat_tokens_generated_total")
        )
        assert float(tokens.split()[-1]) == r.json()["usage"]["completion_tokens"]
        assert "memchat_memory_read_seconds_count 1.0" in text
        assert "memchat_time_to_first_token_seconds_count" in text


def test_not_ready_until_the_model_loads(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        model_path=tmp_path / "no-such-model",
        json_logs=False,
        log_level="ERROR",
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/livez").status_code == 200
        for _ in range(100):
            r = client.get("/readyz")
            if "failed" in r.json()["checks"]["model"]:
                break
            assert r.status_code == 503
            time.sleep(0.05)
        assert r.status_code == 503 and "no-such-model" in r.json()["checks"]["model"]
        assert r.json()["checks"]["database"] == "ok"
        r = client.post("/v1/sessions", json={})
        assert r.status_code == 503 and "no-such-model" in r.json()["error"]["message"]
        assert r.headers["retry-after"]
