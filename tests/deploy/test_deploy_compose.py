"""docker-compose.yml and .env.example, checked without a Docker engine: the Compose
Specification's JSON schema, the stack's shape (db with a named volume and a healthcheck, the app
waiting for it, a proxy on port 8000), and every variable given to the app being a real setting,
each setting documented in .env.example with a valid value."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SETTINGS = {f"MEMCHAT_{name.upper()}" for name in Settings.model_fields}


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def compose_validator() -> jsonschema.protocols.Validator:
    """The Compose Specification's schema, as the check-jsonschema package vendors it (the same
    file `check-jsonschema --builtin-schema vendor.compose-spec` uses)."""
    import json

    ref = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(ref.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    errors = sorted(compose_validator().iter_errors(compose()), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["services"]["app"].update(depends_on={"db": {"condition": "healthy"}}),
        lambda d: d["services"]["db"].update(healthcheck={"test": ["CMD"], "intervall": "5s"}),
        lambda d: d.update(servces={}),
        lambda d: d["services"]["app"].update(ports="8000:8000"),
    ],
    ids=["bad-condition", "misspelt-key", "unknown-top-level", "ports-not-a-list"],
)
def test_the_schema_check_rejects_a_broken_file(mutate: Any) -> None:
    doc = copy.deepcopy(compose())
    mutate(doc)
    assert list(compose_validator().iter_errors(doc))


def test_check_jsonschema_cli_agrees() -> None:
    exe = shutil.which("check-jsonschema", path=str(Path(__import__("sys").executable).parent))
    assert exe, "check-jsonschema not installed: `pip install -e '.[dev]'`"
    out = subprocess.run(
        [exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose")
def test_docker_compose_config_validates_and_gives_the_same_environment(
    bench: ModuleType,
) -> None:
    """Debian's docker-compose (1.29) validates the file with its own schema without an engine,
    and resolves the app's environment as bench/replicas.py does."""
    out = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin"},  # no POSTGRES_PASSWORD / HTTP_PORT: the defaults
    )
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)["services"]["app"]["environment"]
    assert {k: str(v) for k, v in resolved.items()} == bench.compose_environment()


def test_stack_shape() -> None:
    doc = compose()
    services = doc["services"]
    assert set(services) == {"db", "app", "proxy"}
    db, app, proxy = services["db"], services["app"], services["proxy"]
    # db: PostgreSQL, data on a named volume, its own healthcheck
    assert re.fullmatch(r"postgres:\d+[\w.-]*", db["image"])
    volume, target = db["volumes"][0].split(":")[:2]
    assert volume in (doc.get("volumes") or {}) and target == "/var/lib/postgresql/data"
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    # app: built here, waits for a healthy db, env from .env.example, listens on 8000 (no fixed
    # host port, so that `--scale app=N` works; the proxy publishes 8000)
    assert app["build"] == "."
    assert app["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert app["env_file"] == [".env.example"]
    assert app["expose"] == ["8000"] and "ports" not in app and "container_name" not in app
    # proxy: a stock image, the config from docker/, port 8000, waits for a healthy app
    assert re.fullmatch(r"nginx:[\d.]+-alpine", proxy["image"])
    assert proxy["depends_on"] == {"app": {"condition": "service_healthy"}}
    assert proxy["ports"] == ["${HTTP_PORT:-8000}:8000"]
    src, dst, mode = proxy["volumes"][0].split(":")
    assert (ROOT / src).is_file() and dst == "/etc/nginx/conf.d/default.conf" and mode == "ro"
    assert "listen 8000;" in (ROOT / src).read_text()
    for svc in services.values():
        assert svc["restart"] == "unless-stopped"
        assert not svc.get("image", "").endswith(":latest") or svc.get("build")


def test_app_environment_holds_only_real_settings(bench: ModuleType) -> None:
    env = bench.compose_environment()
    assert set(env) <= SETTINGS, f"not settings of the app: {sorted(set(env) - SETTINGS)}"
    assert env["MEMCHAT_DATABASE_URL"] == ("postgresql+psycopg://memchat:memchat@db:5432/memchat")
    db = compose()["services"]["db"]["environment"]
    assert (db["POSTGRES_USER"], db["POSTGRES_DB"]) == ("memchat", "memchat")
    assert env["MEMCHAT_PORT"] == "8000" and env["MEMCHAT_HOST"] == "0.0.0.0"
    # the values are valid: the app's settings accept them all
    settings = Settings(_env_file=None, **{k[8:].lower(): v for k, v in env.items()})  # type: ignore[arg-type]
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert settings.auto_migrate is False  # the entrypoint migrates before the server starts
    # with a password given, the app's URL and the db follow it
    env2 = bench.compose_environment(variables={"POSTGRES_PASSWORD": "s3cret"})
    assert env2["MEMCHAT_DATABASE_URL"] == "postgresql+psycopg://memchat:s3cret@db:5432/memchat"


def test_env_example_documents_every_setting(bench: ModuleType) -> None:
    text = ENV_EXAMPLE.read_text()
    assigned = bench.parse_env_file(ENV_EXAMPLE)
    mentioned = set(re.findall(r"^#?\s*(MEMCHAT_[A-Z_]+)=", text, re.M))
    assert SETTINGS <= mentioned, f"undocumented settings: {sorted(SETTINGS - mentioned)}"
    assert set(assigned) <= SETTINGS and mentioned <= SETTINGS
    lines = text.splitlines()
    for key in SETTINGS:  # each one has a comment above it saying what it is
        i = next(n for n, ln in enumerate(lines) if re.match(rf"#?\s*{key}=", ln))
        above = lines[max(0, i - 3) : i]
        assert any(ln.startswith("# ") and "=" not in ln.split()[1] for ln in above), key
    for key, value in assigned.items():  # compose's env-file format: no quotes, no comments
        assert "#" not in value and not value.startswith(("'", '"')) and "$" not in value, key
    Settings(_env_file=None, **{k[8:].lower(): v for k, v in assigned.items()})  # type: ignore[arg-type]


def test_interpolation(bench: ModuleType) -> None:
    f = bench.interpolate
    assert f("a${X:-d}b", {}) == "adb" and f("a${X:-d}b", {"X": "v"}) == "avb"
    assert f("${X:-d}", {"X": ""}) == "d" and f("${X-d}", {"X": ""}) == ""
    assert f("$X/${Y}", {"X": "1", "Y": "2"}) == "1/2" and f("$$X", {"X": "1"}) == "$X"
    with pytest.raises(ValueError, match="required"):
        f("${X:?set it}", {})
