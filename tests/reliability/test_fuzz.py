"""Fuzzing: schemathesis against the served OpenAPI schema, every operation, with auth on and an
API key. Valid and invalid requests (per the schema) must never get a 5xx, and every response must
conform to the schema (status codes declared, bodies of the declared shape, invalid data
rejected). Schema-valid requests may still be refused with a 4xx by design (a message longer
than the session's window in tokens, a capacity over the server's setting), so the check that
every schema-valid request is accepted is left out. Bounded: a fixed number of examples per
operation and mode (``MEMCHAT_FUZZ_EXAMPLES``), replies of a few tokens."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance
from schemathesis.core.parameters import ParameterLocation

from app.config import Settings
from app.db import make_sessionmaker
from app.main import create_app
from app.model import LoadedModel
from app.serving import serve_in_thread
from tests.api.support import FACT, filler

EXAMPLES = int(os.environ.get("MEMCHAT_FUZZ_EXAMPLES", "25"))  # per operation and mode
MAX_TOKENS = 3  # the model is real: keep generated replies short
pytestmark = pytest.mark.slow


def _cap_tokens(body: Any) -> None:
    """Lower a valid but large max_tokens (or min_tokens) so a generated request does not generate
    for minutes."""
    if not isinstance(body, dict):
        return
    for field in ("max_tokens", "max_completion_tokens", "min_tokens"):
        v = body.get(field)
        if isinstance(v, int) and not isinstance(v, bool) and v > MAX_TOKENS:
            body[field] = MAX_TOKENS


def _valid(case: Any, location: ParameterLocation) -> bool:
    """Whether the case generated this part of the request from the schema (not violating it)."""
    info = case.meta.components.get(location) if case.meta else None
    return info is None or info.mode == GenerationMode.POSITIVE


def test_schemathesis_every_operation(lm: LoadedModel, sqlite_url: str) -> None:
    from app.auth import create_key

    db = make_sessionmaker(sqlite_url)
    key = create_key(db, "fuzz", name="schemathesis")[0]
    db.kw["bind"].dispose()
    settings = Settings(
        _env_file=None,
        database_url=sqlite_url,
        auth_enabled=True,
        window=96,
        max_new_tokens=MAX_TOKENS,
        rate_limit_per_minute=0,
        lock_timeout=5,
        json_logs=False,
        log_level="ERROR",
    )
    app = create_app(settings, lm=lm)
    headers = {"Authorization": f"Bearer {key}"}
    ran: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    with serve_in_thread(app) as base:
        import httpx

        with httpx.Client(base_url=base, headers=headers, timeout=120) as http:
            sid = http.post("/v1/sessions", json={"window": 96}).json()["id"]
            history = [{"role": "user", "content": FACT}] + filler(3)
            r = http.post(f"/v1/sessions/{sid}/messages", json={"messages": history})
            assert r.status_code == 200, r.text
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 15, [op.label for op in operations]

        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @hypothesis.settings(
                    max_examples=EXAMPLES,
                    deadline=None,
                    derandomize=True,  # the same cases every run
                    suppress_health_check=list(HealthCheck),
                    phases=[Phase.explicit, Phase.generate],
                    database=None,
                )
                @given(case=op.as_strategy(generation_mode=mode), real=st.booleans())
                def run(case: Any, real: bool) -> None:  # run at once: `op` is this loop's
                    # change only what the case left valid, so that an invalid case stays invalid
                    params = case.path_parameters or {}
                    if real and "session_id" in params and _valid(case, ParameterLocation.PATH):
                        params["session_id"] = sid  # half the cases reach a live session
                    key = headers if _valid(case, ParameterLocation.HEADER) else None
                    _cap_tokens(case.body)
                    response = case.call_and_validate(
                        base_url=base, headers=key, excluded_checks=[positive_data_acceptance]
                    )
                    ran[op.label] += 1  # noqa: B023
                    statuses[response.status_code] += 1
                    assert response.status_code < 500, (op.label, response.text)  # noqa: B023

                try:
                    run()
                except hypothesis.errors.Unsatisfiable:
                    # nothing of the operation can be made invalid (no parameters, no body)
                    assert mode == GenerationMode.NEGATIVE, op.label
    print(f"\nschemathesis: {sum(ran.values())} requests over {len(ran)} operations; "
          f"statuses {dict(sorted(statuses.items()))}")  # fmt: skip
    assert set(ran) == {op.label for op in operations}
