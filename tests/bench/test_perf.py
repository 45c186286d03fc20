"""bench/perf.py end to end at toy sizes: the real model, a real memory, the JSON it prints."""

from __future__ import annotations

import json

import pytest

from bench import perf


def test_perf_prints_rates_ratios_and_scanned_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--sizes", "300", "--formats", "int4", "--tokens", "3", "--repeats", "1"]
    args += ["--turns", "2,3", "--window", "64", "--reply-tokens", "3", "--rounds", "2"]
    args += ["--batch", "1,2"]
    assert perf.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["transformers_generate"]["tokens_per_s"] > 0
    assert out["no_memory"]["int4"]["tokens_per_s"] > 0
    mem = out["memory"]["300"]
    assert mem["tokens"] >= 300 and mem["read_share"] > 0
    scanned = mem["scanned_bytes_per_token"]
    # float16 keys of D=64 per exactly searched entry; int8 codes of the 576-wide hidden states,
    # per token, in blocks of 16
    assert scanned["approximate_slots"] == 0
    assert scanned["keys"] > 0 and scanned["keys"] % (64 * 2) == 0
    assert scanned["keys"] // 128 <= mem["entries"]
    assert scanned["knn"] % (576 * 16) == 0 and 0 <= scanned["knn"] - 576 * mem["tokens"] < 576 * 16
    assert mem["read_gb_per_s"] > 0
    assert set(out["batched"]) >= {"1", "2"}
    turns = out["turns"]
    assert set(turns["at"]) == {"2", "3"} and turns["ratio_turn_3_to_2"] > 0
    assert len(turns["ratio_turn_3_to_2_per_round"]) == 2
    for at in turns["at"].values():  # one conversation per checkpoint, two timed turns each
        assert at["reply_tokens"] == [3, 3]  # min_tokens holds the replies to their length
        assert 0 < at["first_token_seconds"] < at["turn_seconds"]
        assert at["end_of_turn_seconds"] > 0 and at["read_seconds"] >= 0
    assert turns["at"]["3"]["read_seconds"] > 0  # history past a 64-token window: a memory
    assert turns["memory_write_ms"]["n"] == 4


def test_perf_refuses_counts_below_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        perf.main(["--rounds", "0"])
    assert exc.value.code == 2
    assert "--rounds must be at least 1" in capsys.readouterr().err


_FAKE_LLAMA = """
import os, signal


class Llama:
    def __init__(self, path, n_ctx, n_threads, verbose):
        assert os.path.isfile(path) and n_threads == 1
        self.n = 0

    def eval(self, tokens):
        if os.environ.get("FAKE_LLAMA_CRASH"):
            os.kill(os.getpid(), signal.SIGILL)  # what a build for another CPU does here
        self.n += len(tokens)

    def sample(self, temp):
        return self.n
"""


@pytest.mark.parametrize("crash", [False, True])
def test_llama_cpp_runs_in_a_child_that_may_crash(
    tmp_path, monkeypatch: pytest.MonkeyPatch, crash: bool
) -> None:
    """The llama.cpp reference runs in a child process: its rates come back, and a build this
    CPU cannot run (dying of SIGILL at its first decode, as one did here) is reported instead of
    ending the bench. A stand-in `llama_cpp` module plays the library (not a dependency)."""
    (tmp_path / "llama_cpp.py").write_text(_FAKE_LLAMA)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    if crash:
        monkeypatch.setenv("FAKE_LLAMA_CRASH", "1")
    got = perf.llama_cpp_rate([1, 2, 3], 8, 1, gguf=gguf)
    assert got is not None
    if crash:
        assert "signal 4" in got["error"] and "tokens_per_s" not in got
    else:
        assert got["tokens_per_s"] > 0 and got["tokens_per_cpu_s"] > 0 and "error" not in got
